//! `stdd run` as a real process: pcap-file backend, admin endpoint (metrics, health, GET/PUT table, token), SIGTERM.

use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use allocation::rules::proto;
use allocation::{AllocationTable, Flow, MacAddr, Profile};
use distributor::build::{self, tcp_flags, L2};
use distributor::pcap::{Reader, Writer};
use testkit::{free_port, metric, wait_for};

const GROUP: &str = "02:53:54:44:00:01";
const TOKEN: &str = "t0ps3cret";

struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn table() -> AllocationTable {
    testkit::uniform(4)
}

fn start(dir: &Path, admin: u16) -> Daemon {
    start_with(dir, admin, "")
}

fn start_with(dir: &Path, admin: u16, extra: &str) -> Daemon {
    start_with_table(dir, admin, extra, &table())
}

fn start_with_table(dir: &Path, admin: u16, extra: &str, t: &AllocationTable) -> Daemon {
    write_setup(dir, admin, extra, t);
    let child = Command::new(env!("CARGO_BIN_EXE_stdd"))
        .args(["run", "--config"])
        .arg(dir.join("stdd.toml"))
        .env("RUST_LOG", "warn,audit=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start stdd");
    Daemon {
        child,
        dir: dir.to_path_buf(),
    }
}

/// The table, the input capture and `stdd.toml` in `dir`.
fn write_setup(dir: &Path, admin: u16, extra: &str, t: &AllocationTable) {
    allocation::file::save(dir.join("table.toml"), t).expect("table");
    let group: MacAddr = GROUP.parse().expect("mac");
    let l2 = L2::new(group, MacAddr([2, 0xee, 0, 0, 0, 1]));
    let mut w =
        Writer::new(std::fs::File::create(dir.join("in.pcap")).expect("create")).expect("writer");
    for i in 0..400u16 {
        let c = IpAddr::V4([203, 0, 113, (i % 200) as u8 + 1].into());
        let f = build::tcp_frame(
            &l2,
            c,
            30000 + i,
            "198.51.100.10".parse().expect("addr"),
            443,
            tcp_flags::SYN,
            b"",
        );
        w.write(u64::from(i) * 1000, f.len() as u32, &f)
            .expect("write");
    }
    w.into_inner().expect("flush");
    let mut cfg = format!(
        "role = \"front\"\ngroup_mac = \"{GROUP}\"\ncluster_addresses = [\"198.51.100.10\"]\ntable = \"table.toml\"\nbackend = \"pcap-file\"\n\n[[port]]\nname = \"outside\"\nkind = \"outside\"\ninput = \"in.pcap\"\noutput = \"out.pcap\"\n"
    );
    for k in 0..4 {
        cfg += &format!(
            "\n[[port]]\nname = \"tm{k}\"\nkind = \"tm\"\noutput = \"tm{k}.pcap\"\ntms = [{k}]\n"
        );
    }
    cfg += &format!("\n[admin]\nlisten = \"127.0.0.1:{admin}\"\ntoken = \"{TOKEN}\"\n");
    cfg += extra;
    std::fs::write(dir.join("stdd.toml"), cfg).expect("config");
}

#[test]
fn stdd_runs_serves_admin_swaps_tables_and_stops_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("stdd-daemon-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let admin = free_port();
    let mut d = start(&dir, admin);
    let t = table();

    wait_for("healthz", || {
        TcpStream::connect(("127.0.0.1", admin)).is_ok()
            && http(admin, "GET", "/healthz", Some(TOKEN), "").0 == 200
    });
    assert_eq!(
        http(admin, "GET", "/metrics", None, "").0,
        401,
        "the token is required"
    );
    assert_eq!(http(admin, "GET", "/metrics", Some("wrong"), "").0, 401);
    wait_for("all frames steered", || {
        metric(
            &http(admin, "GET", "/metrics", Some(TOKEN), "").1,
            "std_tm_packets_total",
        ) == 400
    });
    let m = http(admin, "GET", "/metrics", Some(TOKEN), "").1;
    assert_eq!(metric(&m, "std_table_version"), 1);
    assert_eq!(
        metric(&m, "std_branch_packets_total{branch=\"endpoint\"}"),
        400
    );
    assert_eq!(metric(&m, "std_drops_total"), 0);

    // The table without its hash key unless asked for it (with the token).
    let (code, body) = http(admin, "GET", "/table", Some(TOKEN), "");
    assert_eq!(
        (code, body.trim_end()),
        (200, allocation::file::render_for(&t, false).trim_end())
    );
    assert!(!body.contains(&t.key().to_hex()), "{body}");
    assert!(
        allocation::file::parse(&body).is_err(),
        "a redacted table loads"
    );
    let (code, body) = http(admin, "GET", "/table?key=include", Some(TOKEN), "");
    assert_eq!(
        (code, body.trim_end()),
        (200, allocation::file::render(&t).trim_end())
    );

    let next = t
        .rebalance(
            0,
            &Profile::Gaussian {
                mean: None,
                sigma: None,
            },
        )
        .expect("rebalance")
        .table;
    let (code, body) = http(
        admin,
        "PUT",
        "/table",
        Some(TOKEN),
        &allocation::file::render(&next),
    );
    assert_eq!(code, 200, "{body}");
    let (code, body) = http(
        admin,
        "PUT",
        "/table",
        Some(TOKEN),
        &allocation::file::render(&next),
    );
    assert_eq!(code, 409, "a stale version is refused: {body}");
    let (code, body) = http(
        admin,
        "PUT",
        "/table",
        Some(TOKEN),
        "version = 3\nnot a table",
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("table rejected"), "{body}");
    let m = http(admin, "GET", "/metrics", Some(TOKEN), "").1;
    assert_eq!(metric(&m, "std_table_version"), 2, "the good table stays");
    assert_eq!(metric(&m, "std_table_swaps_total"), 1);

    // The transition: switch keeps version 2 as previous, PUT is refused
    // meanwhile, commit drops it; abort goes back.
    let (code, body) = http(admin, "GET", "/transition", Some(TOKEN), "");
    assert_eq!(code, 200);
    assert!(body.contains("\"state\":\"idle\""), "{body}");
    assert_eq!(
        http(admin, "POST", "/transition/commit", Some(TOKEN), "").0,
        409
    );
    let v3 = next
        .rebalance(0, &Profile::Uniform)
        .expect("rebalance")
        .table;
    let moved = allocation::rebalance::minimum_moves(&next.counts(0), &v3.counts(0));
    let v3_text = allocation::file::render(&v3);
    let (code, body) = http(admin, "POST", "/transition/switch", Some(TOKEN), &v3_text);
    assert_eq!(code, 200, "{body}");
    let (_, body) = http(admin, "GET", "/transition", Some(TOKEN), "");
    assert!(body.contains("\"state\":\"switched\""), "{body}");
    assert_eq!(
        http(admin, "POST", "/transition/open", Some(TOKEN), "").0,
        200
    );
    let (_, body) = http(admin, "GET", "/transition", Some(TOKEN), "");
    assert!(body.contains("\"state\":\"open\""), "{body}");
    assert!(
        body.contains(&format!("\"moved_buckets\":{moved}")),
        "{body}"
    );
    assert!(body.contains("\"previous_version\":2"), "{body}");
    let m = http(admin, "GET", "/metrics", Some(TOKEN), "").1;
    assert_eq!(metric(&m, "std_transition_switched"), 1);
    assert_eq!(metric(&m, "std_transition_moved_buckets"), moved as u64);
    // The same table again: the state, unchanged (a coordinator retrying).
    let (code, body) = http(admin, "POST", "/transition/switch", Some(TOKEN), &v3_text);
    assert_eq!(code, 200, "idempotent: {body}");
    assert!(body.contains("\"state\":\"open\""), "{body}");
    // Another table: one transition at a time; the same version with other
    // contents is named as such (version and checksum).
    let other_v3 = next
        .rebalance(0, &Profile::Rayleigh { sigma: None })
        .expect("rebalance")
        .table;
    assert_eq!(other_v3.version(), 3);
    let (code, body) = http(
        admin,
        "POST",
        "/transition/switch",
        Some(TOKEN),
        &allocation::file::render(&other_v3),
    );
    assert_eq!(code, 409, "one transition at a time: {body}");
    assert!(
        body.contains(&allocation::file::checksum(&v3)),
        "names the running table: {body}"
    );
    let (code, body) = http(admin, "PUT", "/table", Some(TOKEN), &v3_text);
    assert_eq!(code, 409, "no PUT while switched: {body}");
    let (code, body) = http(admin, "POST", "/transition/abort", Some(TOKEN), "");
    assert_eq!(code, 200, "{body}");
    let m = http(admin, "GET", "/metrics", Some(TOKEN), "").1;
    assert_eq!(
        metric(&m, "std_table_version"),
        2,
        "abort: back to version 2"
    );
    assert_eq!(metric(&m, "std_transition_switched"), 0);
    let (code, body) = http(admin, "POST", "/transition/switch", Some(TOKEN), &v3_text);
    assert_eq!(code, 200, "{body}");
    // The commit carries the TMs' pins: a UDP session its old owner still
    // serves (kept), one toward a TM no table has (refused, counted); a
    // pin of another protocol is a bad request.
    let session = Flow::with_ports(
        allocation::rules::proto::UDP,
        "203.0.113.7".parse().expect("addr"),
        40_000,
        "198.51.100.10".parse().expect("addr"),
        53,
    );
    let owner = v3.tms()[usize::from(v3.steer(&session).tm)].id;
    let old_owner = v3
        .tms()
        .iter()
        .map(|t| t.id)
        .find(|&i| i != owner)
        .expect("another TM");
    let id = control::TableId::of(&v3);
    let step = |pins: &str| {
        format!(
            "{{\"version\":3,\"checksum\":\"{}\",\"pins\":[{pins}]}}",
            id.checksum
        )
    };
    let tm_pins = |tm: u32, proto: u8| {
        format!(
            "{{\"tm\":{tm},\"table\":{{\"version\":3,\"checksum\":\"{}\"}},\"flows\":[[{proto},\"203.0.113.7:40000\",\"198.51.100.10:53\",30000]],\"ports\":[]}}",
            id.checksum
        )
    };
    let (code, body) = http(
        admin,
        "POST",
        "/transition/commit",
        Some(TOKEN),
        &step(&tm_pins(old_owner, 1)),
    );
    assert_eq!(code, 400, "only TCP and UDP are pinned: {body}");
    let (code, body) = http(
        admin,
        "POST",
        "/transition/commit",
        Some(TOKEN),
        &step(&format!("{},{}", tm_pins(old_owner, 17), tm_pins(99, 17))),
    );
    assert_eq!(code, 200, "{body}");
    let answer: control::CommitAnswer = serde_json::from_str(body.trim()).expect("commit answer");
    assert_eq!(answer.pins_refused, Some(1), "{body}");
    let m = http(admin, "GET", "/metrics", Some(TOKEN), "").1;
    assert_eq!(metric(&m, "std_pinned_flows"), 1, "{m}");
    assert_eq!(metric(&m, "std_pins_refused{reason=\"unroutable\"}"), 1);
    let (_, body) = http(admin, "GET", "/transition", Some(TOKEN), "");
    assert!(body.contains("\"pinned_flows\":1"), "{body}");
    let m = http(admin, "GET", "/metrics", Some(TOKEN), "").1;
    assert_eq!(metric(&m, "std_table_version"), 3);
    assert_eq!(metric(&m, "std_transition_switched"), 0);
    let (code, body) = http(admin, "GET", "/table?key=include", Some(TOKEN), "");
    assert_eq!((code, body.trim_end()), (200, v3_text.trim_end()));
    // The history keeps every table installed, newest first: what
    // `stdctl rollback` puts back.
    let (code, body) = http(admin, "GET", "/table/history", Some(TOKEN), "");
    assert_eq!(code, 200, "{body}");
    let kept: Vec<control::TableId> = serde_json::from_str(body.trim()).expect("history");
    assert_eq!(
        kept.iter().map(|t| t.version).collect::<Vec<_>>(),
        vec![3, 2, 1],
        "{body}"
    );
    assert_eq!(kept[1], control::TableId::of(&next));
    let (code, body) = http(
        admin,
        "GET",
        "/table/history/2?key=include",
        Some(TOKEN),
        "",
    );
    assert_eq!(
        (code, body.trim_end()),
        (200, allocation::file::render(&next).trim_end())
    );
    assert_eq!(
        http(admin, "GET", "/table/history/9", Some(TOKEN), "").0,
        404
    );
    assert_eq!(
        http(admin, "GET", "/table/history/x", Some(TOKEN), "").0,
        400
    );
    // The committed table is where stdd starts from.
    assert_eq!(
        allocation::file::load(dir.join("table.toml")).expect("table file"),
        v3,
        "commit saves the table"
    );
    // A different table with the running version: refused, naming both.
    let (code, body) = http(
        admin,
        "PUT",
        "/table",
        Some(TOKEN),
        &allocation::file::render(&other_v3),
    );
    assert_eq!(code, 409, "{body}");
    assert!(
        body.contains(&allocation::file::checksum(&other_v3))
            && body.contains(&allocation::file::checksum(&v3)),
        "{body}"
    );
    // SIGHUP never goes back in version: an older table file is ignored.
    allocation::file::save(dir.join("table.toml"), &t).expect("old table");
    let pid = d.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill")
        .success());
    std::thread::sleep(Duration::from_millis(400));
    let m = http(admin, "GET", "/metrics", Some(TOKEN), "").1;
    assert_eq!(
        metric(&m, "std_table_version"),
        3,
        "the running table stays"
    );

    // SIGTERM: stops.
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = d.child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "stdd did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    if let Some(mut e) = d.child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    assert!(status.success(), "exit {status}: {stderr}");

    // Every frame left through the port of the TM that table version 1 names.
    for k in 0..4u16 {
        let bytes = std::fs::read(dir.join(format!("tm{k}.pcap"))).expect("capture");
        let mut r = Reader::new(&bytes[..]).expect("pcap");
        let mut n = 0;
        while let Some(rec) = r.next_record().expect("record") {
            let src = IpAddr::V4([rec.data[26], rec.data[27], rec.data[28], rec.data[29]].into());
            let sport = u16::from_be_bytes([rec.data[34], rec.data[35]]);
            let flow = Flow::with_ports(
                proto::TCP,
                src,
                sport,
                "198.51.100.10".parse().expect("addr"),
                443,
            );
            assert_eq!(t.steer(&flow).tm, k);
            assert_eq!(&rec.data[..6], &t.tms()[usize::from(k)].mac.0);
            n += 1;
        }
        assert!(n > 50, "TM {k} got {n} frames");
    }
}

#[test]
fn bad_configurations_are_one_clear_line() {
    let dir = std::env::temp_dir().join(format!("stdd-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    allocation::file::save(dir.join("table.toml"), &table()).expect("table");
    let cfg = format!("role = \"front\"\ngroup_mac = \"{GROUP}\"\ntable = \"table.toml\"\nbackend = \"pcap-file\"\n\n[[port]]\nname = \"outside\"\nkind = \"outside\"\ninput = \"in.pcap\"\n\n[[port]]\nname = \"tms\"\nkind = \"tm\"\noutput = \"tms.pcap\"\ntms = [0, 1, 2]\n");
    std::fs::write(dir.join("stdd.toml"), &cfg).expect("config");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_stdd"))
            .args(["run", "--config"])
            .arg(dir.join("stdd.toml"))
            .output()
            .expect("run")
    };
    let o = run();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("TM id 3") && err.contains("has no port"),
        "{err}"
    );
    std::fs::write(
        dir.join("stdd.toml"),
        cfg.replace("tms = [0, 1, 2]", "tms = [0, 1, 2, 3]")
            .replace(GROUP, "zz"),
    )
    .expect("config");
    let o = run();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("group_mac") && o.status.code() == Some(1),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A health endpoint answering 200 while `up`, 503 otherwise.
fn health_server(up: std::sync::Arc<std::sync::atomic::AtomicBool>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let answer = if up.load(std::sync::atomic::Ordering::Relaxed) {
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
            } else {
                "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\nConnection: close\r\n\r\ndown\n"
            };
            let _ = s.write_all(answer.as_bytes());
        }
    });
    port
}

/// `n` TMs' health endpoints (each up while its flag is) and the
/// `[failover]` configuration probing them fast.
fn failover_probes(n: u32) -> (Vec<std::sync::Arc<std::sync::atomic::AtomicBool>>, String) {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    let up: Vec<Arc<AtomicBool>> = (0..n).map(|_| Arc::new(AtomicBool::new(true))).collect();
    let mut extra = String::from("\n[failover]\ninterval_ms = 50\nmisses = 3\ntimeout_ms = 200\n");
    for (k, u) in up.iter().enumerate() {
        let port = health_server(Arc::clone(u));
        extra +=
            &format!("\n[[failover.tm]]\nid = {k}\nhealth = \"http://127.0.0.1:{port}/healthz\"\n");
    }
    (up, extra)
}

#[test]
fn a_tm_that_stops_answering_is_failed_over_and_only_a_new_table_readmits_it() {
    use std::sync::atomic::Ordering;
    let dir = std::env::temp_dir().join(format!("stdd-failover-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let (up, extra) = failover_probes(4);
    let admin = free_port();
    let _d = start_with(&dir, admin, &extra);
    wait_for("healthz", || {
        TcpStream::connect(("127.0.0.1", admin)).is_ok()
            && http(admin, "GET", "/healthz", Some(TOKEN), "").0 == 200
    });
    let m = || http(admin, "GET", "/metrics", Some(TOKEN), "").1;
    wait_for("probes", || metric(&m(), "std_tm_up") == 4);
    assert_eq!(metric(&m(), "std_failed_tms"), 0);
    // Each TM's buckets, by group: what dashboards compare shares with.
    let buckets = |id: u32| -> Vec<String> {
        m().lines()
            .filter(|l| l.starts_with("std_tm_buckets{") && l.contains(&format!("tm_id=\"{id}\"")))
            .map(|l| l.rsplit(' ').next().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(metric(&m(), "std_tm_buckets"), 4096);
    assert_eq!(buckets(2), vec![table().buckets_of(2).to_string()]);
    assert!(m().contains("group=\"default\""));

    // TM 2 stops answering: after three misses its buckets fail over.
    let t0 = Instant::now();
    up[2].store(false, Ordering::Relaxed);
    wait_for("failover", || metric(&m(), "std_failed_tms") == 1);
    let detection = t0.elapsed();
    assert!(detection < Duration::from_secs(2), "{detection:?}");
    let t = table();
    let failover = t.failover(&[2]).expect("failover").table;
    let (code, body) = http(admin, "GET", "/table?key=include", Some(TOKEN), "");
    assert_eq!(
        (code, body.trim_end()),
        (200, allocation::file::render(&failover).trim_end())
    );
    assert_eq!(metric(&m(), "std_failovers_total"), 1);
    assert_eq!(metric(&m(), "std_tm_up{tm_id=\"2\"}"), 0);
    assert_eq!(buckets(2), vec!["0".to_string()]);
    assert_eq!(metric(&m(), "std_tm_buckets"), 4096);

    // It answers again: no flapping, it stays out.
    up[2].store(true, Ordering::Relaxed);
    wait_for("probe up", || metric(&m(), "std_tm_up{tm_id=\"2\"}") == 1);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(metric(&m(), "std_failed_tms"), 1);
    assert_eq!(metric(&m(), "std_failovers_total"), 1);

    // A second failure: the failover table for both, as any distributor computes it.
    up[0].store(false, Ordering::Relaxed);
    wait_for("second failover", || metric(&m(), "std_failed_tms") == 2);
    let both = t.failover(&[0, 2]).expect("failover").table;
    assert_eq!(
        http(admin, "GET", "/table?key=include", Some(TOKEN), "")
            .1
            .trim_end(),
        allocation::file::render(&both).trim_end()
    );
    up[0].store(true, Ordering::Relaxed);

    // Readmission is a new table (what `stdctl tm readmit` pushes).
    let readmit = both
        .rebalance_to_targets(0, &t.counts(0), None)
        .expect("readmit")
        .table;
    let (code, body) = http(
        admin,
        "PUT",
        "/table",
        Some(TOKEN),
        &allocation::file::render(&readmit),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        metric(&m(), "std_failed_tms"),
        0,
        "a table giving them buckets readmits them"
    );

    // A table giving a TM buckets while it is still down (a push built
    // before it failed) does not readmit it: the next probe fails it over
    // again.
    up[1].store(false, Ordering::Relaxed);
    wait_for("third failover", || metric(&m(), "std_failed_tms") == 1);
    assert_eq!(metric(&m(), "std_failovers_total"), 3);
    let stale = readmit.clone().with_version(readmit.version() + 1);
    let (code, body) = http(
        admin,
        "PUT",
        "/table",
        Some(TOKEN),
        &allocation::file::render(&stale),
    );
    assert_eq!(code, 200, "{body}");
    wait_for("failed over again", || {
        metric(&m(), "std_failovers_total") == 4 && metric(&m(), "std_failed_tms") == 1
    });
    assert_eq!(
        http(admin, "GET", "/table?key=include", Some(TOKEN), "")
            .1
            .trim_end(),
        allocation::file::render(&stale.failover(&[1]).expect("failover").table).trim_end()
    );
}

/// TMs 0, 1 in the default group, 2, 3 in group "tls" (TCP 443): a TM of
/// the second group that stops answering fails over within its group.
#[test]
fn a_tm_outside_the_default_group_is_failed_over_too() {
    use std::sync::atomic::Ordering;
    let t = testkit::partitioned(&table(), &[2, 3], vec![testkit::tcp_rule("443")]);
    let dir = std::env::temp_dir().join(format!("stdd-failover-g-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let (up, extra) = failover_probes(4);
    let admin = free_port();
    let _d = start_with_table(&dir, admin, &extra, &t);
    wait_for("healthz", || {
        TcpStream::connect(("127.0.0.1", admin)).is_ok()
            && http(admin, "GET", "/healthz", Some(TOKEN), "").0 == 200
    });
    let m = || http(admin, "GET", "/metrics", Some(TOKEN), "").1;
    wait_for("probes", || metric(&m(), "std_tm_up") == 4);
    up[3].store(false, Ordering::Relaxed);
    wait_for("failover", || metric(&m(), "std_failed_tms") == 1);
    let failover = t.failover(&[3]).expect("failover").table;
    assert_eq!(failover.counts(1)[3], 0);
    assert_eq!(
        failover.counts(1)[2],
        4096,
        "TM 2 takes the whole tls group"
    );
    assert_eq!(
        failover.counts(0),
        t.counts(0),
        "the default group is untouched"
    );
    let (code, body) = http(admin, "GET", "/table?key=include", Some(TOKEN), "");
    assert_eq!(
        (code, body.trim_end()),
        (200, allocation::file::render(&failover).trim_end())
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// An admin request to stdd on loopback `port`.
fn http(port: u16, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    testkit::http(("127.0.0.1", port), method, path, token, body)
}

/// The flows of the frames `start_with_table` feeds stdd.
fn fed_flows() -> Vec<Flow> {
    (0..400u16)
        .map(|i| {
            Flow::with_ports(
                proto::TCP,
                IpAddr::V4([203, 0, 113, (i % 200) as u8 + 1].into()),
                30000 + i,
                "198.51.100.10".parse().expect("addr"),
                443,
            )
        })
        .collect()
}

fn owner(t: &AllocationTable, f: &Flow) -> u32 {
    t.tms()[usize::from(t.steer(f).tm)].id
}

/// Sends SIGHUP to the daemon (a reload).
fn sighup(d: &Daemon) {
    assert!(Command::new("kill")
        .args(["-HUP", &d.child.id().to_string()])
        .status()
        .expect("kill")
        .success());
}

fn kill(d: Daemon) {
    // Killed, not stopped: nothing is saved on the way out; the directory stays.
    let mut d = std::mem::ManuallyDrop::new(d);
    let _ = d.child.kill();
    let _ = d.child.wait();
}

#[test]
fn a_distributor_restarted_mid_transition_drops_what_it_cannot_place_until_pins_or_abort() {
    let dir = std::env::temp_dir().join(format!("stdd-recover-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let from = table();
    let to = from
        .rebalance(
            0,
            &Profile::Custom {
                weights: vec![3.0, 1.0, 1.0, 1.0],
            },
        )
        .expect("rebalance")
        .table;
    let to_text = allocation::file::render(&to);
    let moving = fed_flows()
        .iter()
        .filter(|f| owner(&from, f) != owner(&to, f))
        .count() as u64;
    assert!(moving > 0 && moving < 400, "{moving}");
    let marker = dir.join("table.toml.transition");
    let up = |admin: u16| {
        wait_for("healthz", || {
            TcpStream::connect(("127.0.0.1", admin)).is_ok()
                && http(admin, "GET", "/healthz", Some(TOKEN), "").0 == 200
        });
    };
    let steered = |admin: u16| {
        wait_for("every frame steered or dropped", || {
            let m = http(admin, "GET", "/metrics", Some(TOKEN), "").1;
            metric(&m, "std_tm_packets_total") + metric(&m, "std_drops_total") == 400
        });
        http(admin, "GET", "/metrics", Some(TOKEN), "").1
    };
    let switch = |admin: u16| {
        let (code, body) = http(admin, "POST", "/transition/switch", Some(TOKEN), &to_text);
        assert_eq!(code, 200, "{body}");
        body
    };

    // Switched, then killed: the marker names the table it was switched to.
    let admin = free_port();
    let d = start_with_table(&dir, admin, "", &from);
    up(admin);
    switch(admin);
    assert_eq!(
        allocation::file::load(&marker).expect("marker"),
        to,
        "the switch wrote its marker"
    );
    kill(d);

    // Back on the table file, the flows the two tables disagree on are
    // dropped and counted, the others steered; the state says so.
    let admin = free_port();
    let d = start_with_table(&dir, admin, "", &from);
    up(admin);
    let m = steered(admin);
    assert_eq!(
        metric(&m, "std_drops_total{reason=\"recovering\"}"),
        moving,
        "{m}"
    );
    assert_eq!(metric(&m, "std_tm_packets_total"), 400 - moving);
    let (_, body) = http(admin, "GET", "/transition", Some(TOKEN), "");
    assert!(body.contains("\"state\":\"idle\""), "{body}");
    assert!(body.contains("\"recovering\":{\"version\":2"), "{body}");
    // An abort ends it: the table file's table alone steers, no marker.
    let (code, body) = http(admin, "POST", "/transition/abort", Some(TOKEN), "");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"aborted\":true"), "{body}");
    let (_, body) = http(admin, "GET", "/transition", Some(TOKEN), "");
    assert!(!body.contains("recovering"), "{body}");
    assert!(!marker.exists(), "abort removes the marker");
    // Switched again and killed again.
    switch(admin);
    kill(d);

    let admin = free_port();
    let d = start_with_table(&dir, admin, "", &from);
    up(admin);
    let m = steered(admin);
    assert_eq!(metric(&m, "std_drops_total{reason=\"recovering\"}"), moving);
    // Switched again, still recovering (no pins yet); an open without pins
    // does not end it, one with the TMs' pins does.
    let body = switch(admin);
    assert!(body.contains("\"state\":\"switched\""), "{body}");
    assert!(body.contains("\"recovering\""), "{body}");
    let id = control::TableId::of(&to);
    let named = format!("{{\"version\":2,\"checksum\":\"{}\"}}", id.checksum);
    let (code, body) = http(admin, "POST", "/transition/open", Some(TOKEN), &named);
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("\"recovering\""),
        "no pins, no recovery: {body}"
    );
    let with_pins = format!(
        "{{\"version\":2,\"checksum\":\"{}\",\"pins\":[]}}",
        id.checksum
    );
    let (code, body) = http(admin, "POST", "/transition/open", Some(TOKEN), &with_pins);
    assert_eq!(code, 200, "{body}");
    assert!(!body.contains("recovering"), "{body}");
    assert!(marker.exists(), "the marker stays until the commit");
    let (code, body) = http(admin, "POST", "/transition/commit", Some(TOKEN), &with_pins);
    assert_eq!(code, 200, "{body}");
    assert!(!marker.exists(), "the commit removes the marker");
    assert_eq!(
        allocation::file::load(dir.join("table.toml")).expect("table file"),
        to
    );
    drop(d);

    // A marker that cannot be read: stdd does not start, one line says why.
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(&marker, "version = 2\nnot a table").expect("marker");
    let mut d = start_with_table(&dir, free_port(), "", &from);
    let status = d.child.wait().expect("exits");
    let mut err = String::new();
    if let Some(mut e) = d.child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert_eq!(status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("table.toml.transition"), "{err}");
}

#[test]
fn a_tm_failing_mid_transition_fails_over_both_tables_and_the_transition_carries_on() {
    use std::sync::atomic::Ordering;
    for abort in [false, true] {
        let dir =
            std::env::temp_dir().join(format!("stdd-failover-mid-{}-{abort}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (up, extra) = failover_probes(4);
        let admin = free_port();
        let _d = start_with(&dir, admin, &extra);
        wait_for("healthz", || {
            TcpStream::connect(("127.0.0.1", admin)).is_ok()
                && http(admin, "GET", "/healthz", Some(TOKEN), "").0 == 200
        });
        let m = || http(admin, "GET", "/metrics", Some(TOKEN), "").1;
        wait_for("probes", || metric(&m(), "std_tm_up") == 4);
        let from = table();
        let to = from
            .rebalance(
                0,
                &Profile::Custom {
                    weights: vec![3.0, 1.0, 1.0, 1.0],
                },
            )
            .expect("rebalance")
            .table;
        let (to_id, from_id) = (control::TableId::of(&to), control::TableId::of(&from));
        let (code, body) = http(
            admin,
            "POST",
            "/transition/switch",
            Some(TOKEN),
            &allocation::file::render(&to),
        );
        assert_eq!(code, 200, "{body}");
        let named = format!(
            "{{\"version\":2,\"checksum\":\"{}\",\"pins\":[]}}",
            to_id.checksum
        );
        assert_eq!(
            http(admin, "POST", "/transition/open", Some(TOKEN), &named).0,
            200
        );

        // TM 2 dies while open: both tables fail over, the transition stays open.
        up[2].store(false, Ordering::Relaxed);
        wait_for("failover", || metric(&m(), "std_failed_tms") == 1);
        let (_, body) = http(admin, "GET", "/transition", Some(TOKEN), "");
        let st: control::DistributorTransition = serde_json::from_str(&body).expect("state");
        assert_eq!(st.state, control::DistributorPhase::Open, "{body}");
        let derived = to.failover(&[2]).expect("failover").table;
        let derived_prev = from.failover(&[2]).expect("failover").table;
        assert_eq!(st.table(), control::TableId::of(&derived), "{body}");
        assert_eq!(
            st.previous(),
            Some(control::TableId::of(&derived_prev)),
            "{body}"
        );
        let fo = st.failed_over.clone().expect("failed over");
        assert_eq!(
            (fo.table, fo.previous, fo.tms),
            (to_id.clone(), Some(from_id.clone()), vec![2])
        );
        assert!(st.runs(&to_id));
        let (code, body) = http(admin, "GET", "/table?key=include", Some(TOKEN), "");
        assert_eq!(
            (code, body.trim_end()),
            (200, allocation::file::render(&derived).trim_end())
        );
        // What a resumed push starts from: the operator's tables.
        for (path, want) in [
            ("/table/operator", &to),
            ("/table/operator/previous", &from),
        ] {
            let (code, body) = http(
                admin,
                "GET",
                &format!("{path}?key=include"),
                Some(TOKEN),
                "",
            );
            assert_eq!(
                (code, body.trim_end()),
                (200, allocation::file::render(want).trim_end()),
                "{path}"
            );
        }

        if abort {
            // Back on the failover of the previous table; TM 2 stays failed.
            let by_name = format!("{{\"version\":2,\"checksum\":\"{}\"}}", to_id.checksum);
            let (code, body) = http(admin, "POST", "/transition/abort", Some(TOKEN), &by_name);
            assert_eq!(code, 200, "{body}");
            assert!(body.contains(&from_id.checksum), "{body}");
            let (_, body) = http(admin, "GET", "/table?key=include", Some(TOKEN), "");
            assert_eq!(
                body.trim_end(),
                allocation::file::render(&derived_prev).trim_end()
            );
            assert_eq!(metric(&m(), "std_failed_tms"), 1);
        } else {
            // The commit names the operator's table; the file gets it, not the failover.
            let (code, body) = http(admin, "POST", "/transition/commit", Some(TOKEN), &named);
            assert_eq!(code, 200, "{body}");
            let c: control::CommitAnswer = serde_json::from_str(&body).expect("commit");
            assert_eq!(c.table, to_id);
            assert_eq!(
                allocation::file::load(dir.join("table.toml")).expect("file"),
                to
            );
            let (_, body) = http(admin, "GET", "/transition", Some(TOKEN), "");
            let st: control::DistributorTransition = serde_json::from_str(&body).expect("state");
            assert_eq!(st.state, control::DistributorPhase::Idle);
            assert_eq!(st.table(), control::TableId::of(&derived));
            assert!(st.runs(&to_id), "{body}");
            assert_eq!(metric(&m(), "std_failed_tms"), 1);
            // A second push of the same table (a resumed coordinator) is a no-op.
            let (code, body) = http(
                admin,
                "POST",
                "/transition/switch",
                Some(TOKEN),
                &allocation::file::render(&to),
            );
            assert_eq!(code, 200, "{body}");
            assert!(body.contains("\"state\":\"idle\""), "{body}");
        }
        up[2].store(true, Ordering::Relaxed);
    }
}

/// A raw GET whose reply may be binary and streamed: (status, head, body
/// bytes as sent, chunk framing included).
fn get_bytes(port: u16, path: &str, token: &str) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let at = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(out.len(), |p| p + 4);
    let head = String::from_utf8_lossy(&out[..at]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head, out[at..].to_vec())
}

fn holds(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_capture_is_armed_on_demand_one_at_a_time_and_bad_requests_are_refused_by_name() {
    let dir = std::env::temp_dir().join(format!("stdd-capture-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let admin = free_port();
    let _d = start(&dir, admin);
    wait_for("healthz", || {
        http(admin, "GET", "/healthz", Some(TOKEN), "").0 == 200
    });
    assert_eq!(http(admin, "GET", "/capture?seconds=0.1", None, "").0, 401);
    for (query, named) in [
        ("tm=nosuch", "tm="),
        ("bucket=4096", "bucket="),
        ("sample=0", "sample"),
        ("sample=1.5", "sample"),
        ("seconds=0", "seconds"),
        ("seconds=601", "seconds"),
        ("seconds=soon", "seconds="),
        ("filter=tcp%20port", "filter"),
        ("proto=xyz", "xyz"),
        ("host=10.0.0", "host="),
        ("port=70000", "port="),
        ("snaplen=64", "unknown parameter"),
    ] {
        let (code, body) = http(admin, "GET", &format!("/capture?{query}"), Some(TOKEN), "");
        assert_eq!(code, 400, "{query}: {body}");
        assert!(body.contains(named), "{query}: the cause names it: {body}");
    }
    // One capture at a time: a second while the first runs is refused.
    let first =
        std::thread::spawn(move || get_bytes(admin, "/capture?seconds=1.5&proto=tcp", TOKEN));
    wait_for("the first capture armed", || {
        metric(
            &http(admin, "GET", "/metrics", Some(TOKEN), "").1,
            "std_capture_armed",
        ) == 1
    });
    let (code, body) = http(admin, "GET", "/capture?seconds=0.2", Some(TOKEN), "");
    assert_eq!(code, 409, "{body}");
    let (code, head, body) = first.join().expect("first capture");
    assert_eq!(code, 200, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("application/x-pcapng"),
        "{head}"
    );
    assert!(
        holds(&body, &[0x0a, 0x0d, 0x0d, 0x0a]),
        "a section header block"
    );
    assert!(
        holds(&body, &0x1a2b_3c4du32.to_le_bytes()),
        "little-endian pcapng"
    );
    assert!(holds(&body, b"outside"), "an interface per port, named");
    assert!(
        holds(&body, b"std capture: frames=0 kernel=0 worker=0"),
        "the closing statistics block (the input was steered before the capture)"
    );
    // Disarmed after it, and a next capture is taken.
    let m = http(admin, "GET", "/metrics", Some(TOKEN), "").1;
    assert_eq!(metric(&m, "std_capture_armed"), 0);
    assert_eq!(metric(&m, "std_capture_sessions_total"), 1);
    let (code, _, body) = get_bytes(admin, "/capture?seconds=0.2&sample=0.5&tm=tm1", TOKEN);
    assert_eq!(code, 200);
    assert!(holds(&body, b"std capture: frames=0"));
}

#[test]
fn check_config_passes_a_sound_configuration_and_names_every_problem_of_another() {
    use std::os::unix::fs::PermissionsExt;
    let scratch = testkit::Scratch::new("stdd-check");
    let dir = scratch.path().to_path_buf();
    let check = || {
        Command::new(env!("CARGO_BIN_EXE_stdd"))
            .args(["check-config", "--config"])
            .arg(dir.join("stdd.toml"))
            .output()
            .expect("stdd check-config")
    };
    write_setup(&dir, free_port(), "", &table());
    let key = dir.join("table.toml");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let out = check();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.starts_with("ok: ") && said.contains("table version 1 (4 TMs, 1 groups)"),
        "{said}"
    );
    // Three problems at once: the key readable by all, a missing input
    // capture, a CPU that does not exist — a line each, exit 1.
    write_setup(&dir, free_port(), "\n[workers]\ncpus = [4095]\n", &table());
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    std::fs::remove_file(dir.join("in.pcap")).expect("rm");
    let out = check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let lines: Vec<&str> = err.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("readable by every user (mode 644)")),
        "{err}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("port outside: input") && l.contains("in.pcap")),
        "{err}"
    );
    assert!(
        lines.iter().any(|l| l.contains("workers.cpus: CPU 4095")),
        "{err}"
    );
    assert!(err.contains("3 problems"), "{err}");
    // A table that does not parse, and a configuration that does not.
    std::fs::write(&key, "not a table").expect("write");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let err = String::from_utf8_lossy(&check().stderr).to_string();
    assert!(err.lines().any(|l| l.starts_with("stdd: table ")), "{err}");
    std::fs::write(dir.join("stdd.toml"), "role = \"front\"\n").expect("write");
    let out = check();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("missing field `group_mac`"),
        "the cause names the key"
    );
}

#[test]
fn state_changing_requests_are_audited_with_who_what_and_the_result() {
    let dir = std::env::temp_dir().join(format!("stdd-audit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let admin = free_port();
    let mut d = start_with(&dir, admin, "");
    wait_for("healthz", || {
        http(admin, "GET", "/healthz", Some(TOKEN), "").0 == 200
    });
    let t = table();
    assert_eq!(http(admin, "PUT", "/table", Some("wrong"), "x").0, 401);
    assert_eq!(
        http(
            admin,
            "PUT",
            "/table",
            Some(TOKEN),
            &allocation::file::render(&t)
        )
        .0,
        409
    );
    assert_eq!(
        http(admin, "POST", "/transition/abort", Some(TOKEN), "").0,
        200
    );
    assert_eq!(
        http(admin, "GET", "/table?key=include", Some(TOKEN), "").0,
        200
    );
    let _ = d.child.kill();
    let _ = d.child.wait();
    let mut err = String::new();
    if let Some(mut e) = d.child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let audit: Vec<&str> = err
        .lines()
        .filter(|l| l.contains(" audit]") || l.contains("audit "))
        .collect();
    let has = |what: &str| audit.iter().any(|l| l.contains(what));
    assert!(
        has("PUT /table -> 401 missing or wrong bearer token"),
        "{err}"
    );
    assert!(has("PUT /table -> 409"), "{err}");
    assert!(has("POST /transition/abort -> 200"), "{err}");
    assert!(
        audit.iter().all(|l| l.contains("127.0.0.1:")),
        "who: the peer: {err}"
    );
    assert!(!has("GET /table"), "reads are not audited: {err}");
    assert!(
        !err.contains("[hash]") && !err.contains("key ="),
        "no table body in the log: {err}"
    );
}

#[test]
fn sighup_reloads_the_failover_section_probing_what_it_now_lists() {
    let dir = std::env::temp_dir().join(format!("stdd-failover-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let admin = free_port();
    // Started without [failover]: nothing probed.
    let d = start(&dir, admin);
    wait_for("healthz", || {
        http(admin, "GET", "/healthz", Some(TOKEN), "").0 == 200
    });
    let m = || http(admin, "GET", "/metrics", Some(TOKEN), "").1;
    assert!(!m().contains("std_tm_up{"), "no TM probed");
    let hup = || sighup(&d);
    // A reload adds probes of four TMs, all answering.
    let (up, extra) = failover_probes(4);
    let cfg = dir.join("stdd.toml");
    let base = std::fs::read_to_string(&cfg).expect("config");
    let with = format!(
        "{base}{}",
        extra.replace("timeout_ms = 200", "timeout_ms = 200\nstartup_grace_ms = 0")
    );
    std::fs::write(&cfg, &with).expect("config");
    hup();
    wait_for("the four TMs probed, up", || metric(&m(), "std_tm_up") == 4);
    // A reload without the section stops the probing.
    std::fs::write(&cfg, &base).expect("config");
    hup();
    wait_for("no TM probed", || !m().contains("std_tm_up{"));
    // Listed again, TM 1 not answering: the reloaded prober fails it over.
    up[1].store(false, std::sync::atomic::Ordering::Relaxed);
    std::fs::write(&cfg, &with).expect("config");
    hup();
    wait_for("TM 1 failed over", || metric(&m(), "std_failed_tms") == 1);
    assert_eq!(metric(&m(), "std_failovers_total"), 1);
    assert_eq!(metric(&m(), "std_tm_up"), 3);
}

/// SIGHUP reads the admin endpoint's token and TLS files again: a renewed
/// certificate at the same paths (here from another CA) and a new token
/// take effect for new connections; a key that does not load refuses the
/// whole reload and the running settings stay. Mutual TLS throughout: the
/// audit line names the client certificate.
#[test]
fn sighup_renews_the_admin_certificate_and_token() {
    use admin_http::client::{Client, Endpoint};
    use admin_http::tls::ClientTls;
    let scratch = testkit::Scratch::new("stdd-tls-reload");
    let dir = scratch.path().to_path_buf();
    let admin = free_port();
    let one = testkit::pki::Ca::new(&dir, "one");
    let node = one.server(&dir, "node", &["127.0.0.1"]);
    let operator = one.client(&dir, "operator");
    let extra = format!(
        "\n[admin.tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
        node.cert.display(),
        node.key.display(),
        one.pem.display()
    );
    let d = start_with(&dir, admin, &extra);
    let trusting = |ca: &Path| {
        let tls = ClientTls {
            ca: Some(ca.to_path_buf()),
            cert: Some(operator.cert.clone()),
            key: Some(operator.key.clone()),
        };
        Client::with_tls(Duration::from_secs(2), tls.load("tls").expect("client"))
    };
    let endpoint = |token: &str| Endpoint {
        name: "stdd".into(),
        url: format!("https://127.0.0.1:{admin}"),
        token: Some(token.into()),
    };
    let healthz = |c: &Client, token: &str| c.request(&endpoint(token), "GET", "/healthz", None);
    wait_for("healthz over HTTPS", || {
        matches!(healthz(&trusting(&one.pem), TOKEN), Ok((200, _)))
    });
    let hup = || sighup(&d);
    // Renewed: a certificate from CA "two" at the same paths, a new token.
    let two = testkit::pki::Ca::new(&dir, "two");
    two.server(&dir, "node", &["127.0.0.1"]);
    let cfg = dir.join("stdd.toml");
    let text = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(&cfg, text.replace(TOKEN, "n3w-t0ken")).expect("config");
    hup();
    wait_for("the renewed certificate served", || {
        matches!(healthz(&trusting(&two.pem), "n3w-t0ken"), Ok((200, _)))
    });
    let old = healthz(&trusting(&one.pem), "n3w-t0ken").expect_err("old CA");
    assert!(old.to_string().contains("UnknownIssuer"), "{old}");
    assert_eq!(
        healthz(&trusting(&two.pem), TOKEN).expect("answered").0,
        401,
        "the old token still accepted"
    );
    // A key that does not load: the reload is refused, the settings stay.
    std::fs::write(&node.key, "not a key\n").expect("key");
    hup();
    std::thread::sleep(Duration::from_millis(500));
    assert!(matches!(
        healthz(&trusting(&two.pem), "n3w-t0ken"),
        Ok((200, _))
    ));
    // A state-changing request: audited with the certificate's fingerprint.
    let said = trusting(&two.pem)
        .request(&endpoint("n3w-t0ken"), "POST", "/transition/abort", None)
        .expect("answered");
    let mut d = d;
    let _ = d.child.kill();
    let _ = d.child.wait();
    let mut stderr = String::new();
    if let Some(mut e) = d.child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    assert!(
        stderr.contains("SIGHUP: reload refused") && stderr.contains("admin.tls.key"),
        "{stderr}"
    );
    let fingerprint = admin_http::tls::fingerprint(&operator.der);
    assert!(
        stderr.contains(&format!(
            "cert=sha256:{fingerprint} POST /transition/abort -> {}",
            said.0
        )),
        "{stderr}"
    );
}
