//! End-to-end tests of the stdctl binary: real files, real processes, output checked against the library.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use allocation::rules::proto;
use allocation::{file, Flow};
use serde_json::Value;

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("stdctl-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        Dir(d)
    }
    fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn stdctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stdctl"))
        .args(args)
        .output()
        .expect("run stdctl")
}

fn ok(args: &[&str]) -> String {
    let o = stdctl(args);
    assert!(
        o.status.success(),
        "stdctl {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("utf-8")
}

fn json(args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    serde_json::from_str(&ok(&a)).expect("json output")
}

/// Fails with `code` and exactly one line on stderr that contains `needle`.
fn fails(args: &[&str], code: i32, needle: &str) {
    let o = stdctl(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "stdctl {args:?}: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
    assert!(
        err.starts_with("stdctl: ") && err.contains(needle),
        "stdctl {args:?}: {err}"
    );
    assert!(o.stdout.is_empty());
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

const KEY: &str = "000102030405060708090a0b0c0d0e0f";

#[test]
fn build_rebalance_diff_lookup_selfports() {
    let d = Dir::new("flow");
    let (t, g) = (d.path("t.toml"), d.path("g.toml"));
    ok(&["table", "new", "--tms", "8", "--key", KEY, "-o", s(&t)]);
    assert!(ok(&["table", "verify", s(&t)]).contains("valid"));

    let shown = json(&["table", "show", s(&t)]);
    let entries: Vec<u64> = shown["groups"][0]["tms"]
        .as_array()
        .expect("tms")
        .iter()
        .map(|r| r["entries"].as_u64().expect("entries"))
        .collect();
    assert_eq!(entries, vec![512; 8]);

    let r = json(&[
        "rebalance",
        "--table",
        s(&t),
        "--profile",
        "gaussian",
        "-o",
        s(&g),
    ]);
    assert_eq!(r["moved"], r["optimum"]);
    assert_eq!(r["new_version"], 2);
    let new = file::load(&g).expect("new table");
    let old = file::load(&t).expect("old table");
    let moved = (0..4096)
        .filter(|&b| old.groups()[0].buckets.get(b) != new.groups()[0].buckets.get(b))
        .count();
    assert_eq!(r["moved"].as_u64(), Some(moved as u64));
    let want: u64 = old
        .counts(0)
        .iter()
        .zip(new.counts(0))
        .map(|(&a, b)| u64::from(a.saturating_sub(b)))
        .sum();
    assert_eq!(moved as u64, want, "the minimum number of moves");

    let diff = json(&["table", "diff", s(&t), s(&g)]);
    assert_eq!(diff["groups"][0]["moved"].as_u64(), Some(moved as u64));
    assert_eq!(diff["groups"][0]["optimum"].as_u64(), Some(moved as u64));

    let l = json(&[
        "lookup",
        "--table",
        s(&g),
        "203.0.113.7:6900",
        "198.51.100.1:80",
    ]);
    let rev = json(&[
        "lookup",
        "--table",
        s(&g),
        "198.51.100.1:80",
        "203.0.113.7:6900",
    ]);
    assert_eq!(l["tm"], rev["tm"], "a flow and its reply agree");
    assert_eq!(l["hashed"], "203.0.113.7:6900");
    let flow = Flow::with_ports(proto::TCP, ip("203.0.113.7"), 6900, ip("198.51.100.1"), 80);
    assert_eq!(
        l["tm"]["index"].as_u64(),
        Some(u64::from(new.steer(&flow).tm))
    );
    let v6 = json(&[
        "lookup",
        "--table",
        s(&g),
        "[2001:db8::1]:443",
        "[2001:db8::2]:50000",
        "--protocol",
        "udp",
    ]);
    assert_eq!(v6["hashed"], "[2001:db8::2]:50000");
    let icmp = json(&[
        "lookup",
        "--table",
        s(&g),
        "192.0.2.1",
        "198.51.100.1",
        "--protocol",
        "icmp",
    ]);
    assert!(icmp["hashed"].is_null() && icmp["bucket"].is_u64());

    let sp = json(&[
        "selfports",
        "--table",
        s(&g),
        "--addr",
        "10.1.0.1",
        "--tm",
        "tm3",
        "--above",
        "8080",
    ]);
    let ports = sp["ports"].as_array().expect("ports");
    assert!(ports.len() > 1000);
    for p in ports {
        let p = p.as_u64().expect("port") as u16;
        assert!(p > 8080);
        let reply = Flow::with_ports(proto::TCP, ip("198.51.100.1"), 8080, ip("10.1.0.1"), p);
        assert_eq!(new.steer(&reply).tm, 3, "port {p} steers elsewhere");
    }
    let count = ok(&[
        "selfports",
        "--table",
        s(&g),
        "--addr",
        "10.1.0.1",
        "--tm",
        "3",
        "--above",
        "8080",
        "--count",
    ]);
    assert_eq!(count.trim().parse::<usize>().expect("count"), ports.len());
}

#[test]
fn tm_add_remove_and_failover() {
    let d = Dir::new("tm");
    let (t, a, r, f) = (
        d.path("t.toml"),
        d.path("a.toml"),
        d.path("r.toml"),
        d.path("f.toml"),
    );
    ok(&[
        "table",
        "new",
        "--tms",
        "4",
        "--profile",
        "weighted",
        "--weights",
        "1,1,2,4",
        "--key",
        KEY,
        "-o",
        s(&t),
    ]);
    let added = json(&[
        "tm",
        "add",
        "--table",
        s(&t),
        "--name",
        "tm-new",
        "--mac",
        "02:aa:00:00:00:09",
        "--weight",
        "2",
        "-o",
        s(&a),
    ]);
    assert_eq!(added["moved"], added["optimum"]);
    let ta = file::load(&a).expect("table");
    assert_eq!(ta.tms().len(), 5);
    assert_eq!(ta.tms()[4].id, 4);
    let removed = json(&[
        "tm",
        "remove",
        "--table",
        s(&a),
        "--tm",
        "tm-new",
        "-o",
        s(&r),
    ]);
    assert_eq!(removed["new_version"], 3);
    assert_eq!(
        file::load(&r).expect("table").counts(0),
        file::load(&t).expect("table").counts(0)
    );
    let fo = json(&["failover", "--table", s(&t), "--tm", "3", "-o", s(&f)]);
    let base = file::load(&t).expect("table");
    assert_eq!(fo["moved"].as_u64(), Some(u64::from(base.counts(0)[3])));
    let tf = file::load(&f).expect("table");
    assert_eq!(tf.counts(0)[3], 0);
    for b in 0..4096 {
        let (was, now) = (
            base.groups()[0].buckets.get(b),
            tf.groups()[0].buckets.get(b),
        );
        assert!(was == now || was == 3, "bucket {b} of a survivor moved");
    }
}

#[test]
fn bad_arguments_and_files_give_one_line() {
    let d = Dir::new("bad");
    let t = d.path("t.toml");
    ok(&["table", "new", "--tms", "4", "--key", KEY, "-o", s(&t)]);
    fails(
        &["table", "new", "--tms", "0", "-o", s(&d.path("x.toml"))],
        1,
        "--tms must be 1 to 4096",
    );
    fails(&["table", "new", "--tms", "4", "-o", s(&t)], 1, "exists");
    fails(
        &[
            "table",
            "new",
            "--tms",
            "4",
            "--profile",
            "gaussian",
            "--sigma",
            "-1",
            "-o",
            s(&d.path("x.toml")),
        ],
        1,
        "sigma",
    );
    fails(
        &[
            "table",
            "new",
            "--tms",
            "4",
            "--profile",
            "custom",
            "-o",
            s(&d.path("x.toml")),
        ],
        1,
        "--weights",
    );
    fails(
        &[
            "table",
            "new",
            "--tms",
            "4",
            "--mac-base",
            "zz",
            "-o",
            s(&d.path("x.toml")),
        ],
        1,
        "MAC address",
    );
    fails(
        &[
            "table",
            "new",
            "--tms",
            "4",
            "--key",
            "12",
            "-o",
            s(&d.path("x.toml")),
        ],
        1,
        "hash key",
    );
    fails(
        &["table", "new", "--tms", "four", "-o", s(&d.path("x.toml"))],
        2,
        "four",
    );
    fails(&["table", "frob"], 2, "frob");
    fails(
        &["lookup", "--table", s(&t), "1.2.3.4", "5.6.7.8"],
        1,
        "needs ports",
    );
    fails(
        &["lookup", "--table", s(&t), "1.2.3.4:1", "nope"],
        1,
        "not an endpoint",
    );
    fails(
        &[
            "selfports",
            "--table",
            s(&t),
            "--addr",
            "10.0.0.1",
            "--tm",
            "9",
        ],
        1,
        "no TM",
    );
    fails(
        &[
            "rebalance",
            "--table",
            s(&t),
            "--profile",
            "weighted",
            "--weights",
            "1,2",
        ],
        1,
        "2 values for 4 TMs",
    );
    fails(
        &["table", "show", s(&d.path("missing.toml"))],
        1,
        "No such file",
    );

    // A corrupted entry: the checksum names the problem; seal is the way back after a deliberate edit.
    let text = std::fs::read_to_string(&t).expect("read");
    let edited = d.path("e.toml");
    std::fs::write(&edited, text.replacen("version = 1", "version = 5", 1)).expect("write");
    fails(&["table", "verify", s(&edited)], 1, "checksum mismatch");
    ok(&["table", "seal", s(&edited)]);
    assert!(ok(&["table", "verify", s(&edited)]).contains("version 5"));
    // Truncated and binary files.
    std::fs::write(d.path("trunc.toml"), &text[..300]).expect("write");
    fails(
        &["table", "show", s(&d.path("trunc.toml"))],
        1,
        "not a valid table file",
    );
    std::fs::write(d.path("bin.toml"), [0xff, 0xfe, 0]).expect("write");
    fails(&["table", "verify", s(&d.path("bin.toml"))], 1, "not UTF-8");
    // An entry naming a TM that does not exist: its bucket is named.
    let i = text.find("entries = [\n  \"").expect("entries") + 15;
    let mut bad = text.clone();
    bad.replace_range(i..i + 1, "7");
    std::fs::write(d.path("unknown.toml"), bad).expect("write");
    fails(
        &["table", "verify", s(&d.path("unknown.toml"))],
        1,
        "bucket 0): TM id 7 is not in the [[tm]] list",
    );
}

#[test]
fn help_is_available_everywhere() {
    for args in [
        vec!["--help"],
        vec!["table", "--help"],
        vec!["table", "new", "--help"],
        vec!["lookup", "--help"],
        vec!["selfports", "--help"],
        vec!["rebalance", "--help"],
        vec!["tm", "add", "--help"],
        vec!["failover", "--help"],
    ] {
        let out = ok(&args);
        assert!(out.contains("Usage:"), "{args:?}");
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("addr")
}

/// `group add`: a TLS partition of existing TMs, checked by the library
/// (their buckets left the default group with the fewest moves, the rule
/// selects the group); bad rules and impossible partitions are one line.
#[test]
fn group_add_partitions_the_tms() {
    let d = Dir::new("group");
    let (t, p) = (d.path("t.toml"), d.path("p.toml"));
    ok(&["table", "new", "--tms", "5", "--key", KEY, "-o", s(&t)]);
    let o = ok(&[
        "group",
        "add",
        "--table",
        s(&t),
        "--name",
        "tls",
        "--rule",
        "protocol=tcp,ports=443",
        "--tms",
        "3,tm4",
        "-o",
        s(&p),
    ]);
    assert!(o.contains("group 'tls' of 2 TM(s)"), "{o}");
    let before = file::load(&t).expect("table");
    let after = file::load(&p).expect("partitioned");
    assert_eq!(after.version(), before.version() + 1);
    assert_eq!(after.groups()[1].name, "tls");
    assert_eq!((after.counts(1)[3], after.counts(1)[4]), (2048, 2048));
    assert_eq!(after.counts(0)[3] + after.counts(0)[4], 0);
    let moved = allocation::rebalance::minimum_moves(&before.counts(0), &after.counts(0));
    assert_eq!(moved, (before.counts(0)[3] + before.counts(0)[4]) as usize);
    let c: IpAddr = "203.0.113.9".parse().expect("addr");
    let vip: IpAddr = "198.51.100.10".parse().expect("addr");
    let tls = Flow::with_ports(proto::TCP, c, 40000, vip, 443);
    let web = Flow::with_ports(proto::TCP, c, 40000, vip, 80);
    assert_eq!(after.steer(&tls).group, 1);
    assert!([3, 4].contains(&after.steer(&tls).tm));
    assert_eq!(after.steer(&web).group, 0);
    // One line each: an unknown key, a group that would leave the default
    // group empty, a name taken.
    let x = d.path("x.toml");
    for (args, want) in [
        (
            vec!["--rule", "protocl=tcp", "--tms", "3"],
            "unknown key 'protocl'",
        ),
        (vec!["--rule", "ports=443", "--tms", "0,1,2,3,4"], "default"),
        (vec!["--rule", "ports=99999", "--tms", "3"], "99999"),
    ] {
        let mut a = vec!["group", "add", "--table", s(&t), "--name", "x"];
        a.extend(args);
        a.extend(["-o", s(&x)]);
        let o = stdctl(&a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(want), "{want}: {err}");
    }
    let y = d.path("y.toml");
    let o = stdctl(&[
        "group",
        "add",
        "--table",
        s(&p),
        "--name",
        "tls",
        "--rule",
        "ports=53",
        "--tms",
        "2",
        "-o",
        s(&y),
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("exists already"));
}
