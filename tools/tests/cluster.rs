//! stdctl against a cluster of scripted admin endpoints: the transition protocol's order, the drain, rollback when a node fails, dry runs, drain and readmit tables.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use allocation::{file, AllocationTable, GroupSpec, HashKey, MacAddr, Profile, Tm};

/// Every request any fake node received: (node, "METHOD path", body).
type Log = Arc<Mutex<Vec<(String, String, String)>>>;

/// How a fake node answers.
#[derive(Clone)]
struct Script {
    /// (method path) → status code to answer instead of 200.
    fail: Vec<(String, u16)>,
    /// Connections in moved buckets reported by successive GET /transition (then 0).
    moving: Vec<u64>,
    /// The table GET /table answers (distributors).
    table: String,
}

fn fake_node(name: &str, script: Script, log: Log) -> String {
    let server = tiny_http::Server::http("127.0.0.1:0").expect("bind");
    let addr = server.server_addr().to_ip().expect("ip addr");
    let name = name.to_string();
    std::thread::spawn(move || {
        let mut polls = 0usize;
        for mut req in server.incoming_requests() {
            let what = format!("{} {}", req.method(), req.url());
            let mut body = String::new();
            let _ = req.as_reader().read_to_string(&mut body);
            log.lock()
                .expect("log")
                .push((name.clone(), what.clone(), body));
            let code = script
                .fail
                .iter()
                .find(|(w, _)| *w == what)
                .map_or(200, |&(_, c)| c);
            let text = match what.as_str() {
                _ if code != 200 => "scripted failure".to_string(),
                "GET /table" => script.table.clone(),
                "GET /transition" => {
                    let m = script.moving.get(polls).copied().unwrap_or(0);
                    polls += 1;
                    format!("{{\"phase\":\"prepared\",\"connections_in_moved_buckets\":{m}}}")
                }
                "GET /transition/ports" => "[[\"10.20.0.100\", 4242]]".to_string(),
                "POST /transition/prepare" => {
                    "{\"phase\":\"prepared\",\"connections_in_moved_buckets\":3}".to_string()
                }
                _ => "ok".to_string(),
            };
            let _ = req.respond(tiny_http::Response::from_string(text).with_status_code(code));
        }
    });
    format!("http://{addr}")
}

fn table() -> AllocationTable {
    let tms = (0..3)
        .map(|i| Tm {
            id: i,
            name: format!("tm{i}"),
            mac: MacAddr([2, 0x53, 0x54, 0, 0, i as u8 + 1]),
            weight: 1,
            group: 0,
        })
        .collect();
    AllocationTable::new(
        4,
        HashKey::from_bytes([6; 16]),
        tms,
        vec![GroupSpec::default_group(Profile::Uniform)],
    )
    .expect("table")
}

struct Cluster {
    dir: PathBuf,
    log: Log,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Two distributors and three TMs; `script(node)` says how each answers.
fn cluster(name: &str, script: impl Fn(&str) -> Script) -> Cluster {
    let dir = std::env::temp_dir().join(format!("stdctl-cluster-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let log: Log = Arc::default();
    let mut text = String::from("drain_window_s = 5\npoll_ms = 20\ntimeout_ms = 2000\n");
    for d in ["front", "back"] {
        let url = fake_node(d, script(d), Arc::clone(&log));
        text += &format!("\n[[distributor]]\nname = \"{d}\"\nadmin = \"{url}\"\ntoken = \"x\"\n");
    }
    for k in 0..3 {
        let n = format!("tm{k}");
        let url = fake_node(&n, script(&n), Arc::clone(&log));
        text += &format!("\n[[tm]]\nid = {k}\nadmin = \"{url}\"\n");
    }
    std::fs::write(dir.join("cluster.toml"), text).expect("cluster file");
    Cluster { dir, log }
}

fn normal(_: &str) -> Script {
    Script {
        fail: Vec::new(),
        moving: vec![4, 1],
        table: file::render(&table()),
    }
}

fn stdctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stdctl"))
        .args(args)
        .output()
        .expect("run stdctl")
}

impl Cluster {
    fn file(&self) -> String {
        self.dir.join("cluster.toml").display().to_string()
    }
    fn posts(&self) -> Vec<(String, String)> {
        self.log
            .lock()
            .expect("log")
            .iter()
            .filter(|(_, w, _)| w.starts_with("POST"))
            .map(|(n, w, _)| (n.clone(), w.clone()))
            .collect()
    }
    fn body_of(&self, node: &str, what: &str) -> Option<String> {
        self.log
            .lock()
            .expect("log")
            .iter()
            .find(|(n, w, _)| n == node && w == what)
            .map(|(_, _, b)| b.clone())
    }
}

fn p(n: &str, w: &str) -> (String, String) {
    (n.to_string(), format!("POST /transition/{w}"))
}

#[test]
fn push_runs_every_phase_in_order_and_waits_for_the_drain() {
    let c = cluster("push", normal);
    let next = table()
        .rebalance(
            0,
            &Profile::Gaussian {
                mean: None,
                sigma: None,
            },
        )
        .expect("rebalance")
        .table;
    let path = c.dir.join("next.toml");
    file::save(&path, &next).expect("save");
    let o = stdctl(&["push", &path.display().to_string(), "--cluster", &c.file()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let want: Vec<(String, String)> = vec![
        p("tm0", "prepare"),
        p("tm1", "prepare"),
        p("tm2", "prepare"),
        p("front", "switch"),
        p("back", "switch"),
        p("front", "open"),
        p("back", "open"),
        p("front", "commit"),
        p("back", "commit"),
        p("tm0", "commit"),
        p("tm1", "commit"),
        p("tm2", "commit"),
    ];
    assert_eq!(c.posts(), want);
    assert_eq!(
        c.body_of("back", "POST /transition/switch"),
        Some(file::render(&next))
    );
    assert!(out.contains("installed table version 5 (from 4)"), "{out}");
    // The drain went 12 → 3 → 0 connections (three TMs: 4, 1, 0 each).
    assert!(
        out.contains("12 connections left")
            && out.contains("3 connections left")
            && out.contains("0 connections left"),
        "{out}"
    );
}

#[test]
fn a_tm_that_fails_to_prepare_rolls_every_node_back() {
    let c = cluster("prepare-fails", |n| Script {
        fail: if n == "tm1" {
            vec![("POST /transition/prepare".into(), 500)]
        } else {
            vec![]
        },
        ..normal(n)
    });
    let next = table().with_version(5);
    let path = c.dir.join("next.toml");
    file::save(&path, &next).expect("save");
    let o = stdctl(&["push", &path.display().to_string(), "--cluster", &c.file()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("tm1: POST /transition/prepare: 500") && err.contains("rolled back"),
        "{err}"
    );
    assert_eq!(
        c.posts(),
        vec![p("tm0", "prepare"), p("tm1", "prepare"), p("tm0", "abort")]
    );
}

#[test]
fn a_distributor_that_fails_to_switch_rolls_every_node_back() {
    let c = cluster("switch-fails", |n| Script {
        fail: if n == "back" {
            vec![("POST /transition/switch".into(), 409)]
        } else {
            vec![]
        },
        ..normal(n)
    });
    let path = c.dir.join("next.toml");
    file::save(&path, &table().with_version(5)).expect("save");
    let o = stdctl(&["push", &path.display().to_string(), "--cluster", &c.file()]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("back: POST /transition/switch: 409"), "{err}");
    let posts = c.posts();
    for want in [
        p("front", "abort"),
        p("tm0", "abort"),
        p("tm1", "abort"),
        p("tm2", "abort"),
    ] {
        assert!(posts.contains(&want), "{want:?} in {posts:?}");
    }
    assert!(!posts
        .iter()
        .any(|(_, w)| w.ends_with("open") || w.ends_with("commit")));
}

#[test]
fn an_older_table_is_refused_before_anything_changes() {
    let c = cluster("stale", normal);
    let path = c.dir.join("old.toml");
    file::save(&path, &table()).expect("save");
    let o = stdctl(&["push", &path.display().to_string(), "--cluster", &c.file()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not newer than the running version 4"));
    assert!(c.posts().is_empty());
}

#[test]
fn rebalance_dry_run_changes_nothing_and_drain_readmit_push_the_right_tables() {
    let c = cluster("drain", normal);
    let o = stdctl(&[
        "rebalance",
        "--cluster",
        &c.file(),
        "--profile",
        "gaussian",
        "--dry-run",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(c.posts().is_empty(), "a dry run posts nothing");

    let o = stdctl(&["tm", "drain", "tm1", "--cluster", &c.file()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pushed = file::parse(
        &c.body_of("front", "POST /transition/switch")
            .expect("switched"),
    )
    .expect("table");
    assert_eq!(pushed.version(), 5);
    assert_eq!(pushed.counts(0)[1], 0, "tm1 drained");
    let min = allocation::rebalance::minimum_moves(&table().counts(0), &pushed.counts(0));
    assert_eq!(
        min,
        table().counts(0)[1] as usize,
        "only tm1's buckets move"
    );

    // Readmit against a cluster running the drained table.
    let drained = file::render(&pushed);
    let c2 = cluster("readmit", |n| Script {
        table: drained.clone(),
        ..normal(n)
    });
    let o = stdctl(&["tm", "readmit", "1", "--cluster", &c2.file()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let back = file::parse(
        &c2.body_of("back", "POST /transition/switch")
            .expect("switched"),
    )
    .expect("table");
    assert_eq!(back.version(), 6);
    // tm1 joins: it is prepared last, with the ports the members hold.
    let prep: Vec<String> = c2
        .posts()
        .into_iter()
        .filter(|(_, w)| w.ends_with("prepare"))
        .map(|(n, _)| n)
        .collect();
    assert_eq!(prep, ["tm0", "tm2", "tm1"]);
    let joining: serde_json::Value = serde_json::from_str(
        &c2.body_of("tm1", "POST /transition/prepare")
            .expect("prepared"),
    )
    .expect("json");
    assert_eq!(
        joining["held"],
        serde_json::json!([["10.20.0.100", 4242], ["10.20.0.100", 4242]])
    );
    assert_eq!(
        file::parse(joining["table"].as_str().expect("table")).expect("table"),
        back
    );
    assert_eq!(
        c2.body_of("tm0", "POST /transition/prepare"),
        Some(file::render(&back)),
        "members get the plain table"
    );
    assert!(
        back.counts(0).iter().all(|&n| (1365..=1366).contains(&n)),
        "{:?}",
        back.counts(0)
    );
    // Readmitting a TM in service, or draining a drained one, is refused.
    let o = stdctl(&["tm", "drain", "1", "--cluster", &c2.file()]);
    assert_eq!(o.status.code(), Some(1));
    let o = stdctl(&["tm", "readmit", "0", "--cluster", &c2.file()]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn status_reports_every_node_and_a_dead_one() {
    let c = cluster("status", normal);
    // Point tm2 at a port nobody listens on.
    let text = std::fs::read_to_string(c.file()).expect("read");
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    if let Some(last_admin) = lines.iter().rposition(|l| l.starts_with("admin")) {
        lines[last_admin] = format!("admin = \"http://{dead}\"");
    }
    std::fs::write(c.file(), lines.join("\n")).expect("write");
    let o = stdctl(&["status", "--cluster", &c.file(), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["table_version"], 4);
    let nodes = v["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 5);
    assert_eq!(nodes[0]["health"], "ok");
    assert!(
        nodes[4]["health"]
            .as_str()
            .expect("health")
            .starts_with("down"),
        "{}",
        nodes[4]
    );
    assert_eq!(v["tms"].as_array().expect("tms").len(), 3);
    let o = stdctl(&["status", "--cluster", "/nonexistent/cluster.toml"]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn draining_one_tm_and_admitting_another_at_once_is_refused() {
    // Running: tm1 drained. Next: tm1 back, tm0 drained.
    let drained = table()
        .rebalance_to_targets(0, &[2048, 0, 2048], None)
        .expect("drain")
        .table;
    let text = file::render(&drained);
    let c = cluster("swap-roles", |n| Script {
        table: text.clone(),
        ..normal(n)
    });
    let next = drained
        .rebalance_to_targets(0, &[0, 2048, 2048], None)
        .expect("swap")
        .table;
    let path = c.dir.join("next.toml");
    file::save(&path, &next).expect("save");
    let o = stdctl(&["push", &path.display().to_string(), "--cluster", &c.file()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("one change, then the other"));
    assert!(c.posts().is_empty());
}
