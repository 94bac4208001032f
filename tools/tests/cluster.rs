//! stdctl against a cluster of scripted admin endpoints: the transition protocol's order, the drain, rollback when a node fails, dry runs, drain and readmit tables.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use allocation::{file, AllocationTable, HashKey, Profile};

/// Every request any fake node received: (node, "METHOD path", body).
type Log = Arc<Mutex<Vec<(String, String, String)>>>;

/// How a fake node answers.
#[derive(Clone)]
struct Script {
    /// (method path) → status code to answer instead of 200.
    fail: Vec<(String, u16)>,
    /// Connections in moved buckets reported by successive GET /transition (then 0).
    moving: Vec<u64>,
    /// The table the node runs at start.
    table: String,
    /// A TM's GET /transition answer while prepared, instead of the real one.
    state_override: Option<(u16, String)>,
    /// (method path) → answer only after this long (a time-out).
    slow: Vec<(String, u64)>,
    /// (method path) → status code to answer the first time only.
    fail_once: Vec<(String, u16)>,
}

/// A node's transition state, as stdd and tmd keep it.
#[derive(Default)]
struct State {
    table: Option<AllocationTable>,
    other: Option<AllocationTable>,
    open: bool,
    /// A TM's id (from its name, `tmN`).
    tm_id: u32,
    /// A distributor's committed tables, oldest first.
    history: Vec<AllocationTable>,
}

fn id(t: &AllocationTable) -> control::TableId {
    control::TableId::of(t)
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("json")
}

/// A distributor's answer to `what` (the semantics of stdd's admin endpoint).
fn distributor(st: &mut State, what: &str, body: &str) -> (u16, String) {
    let cur = st.table.clone().expect("table");
    let dstate = |st: &State| {
        let t = st.table.as_ref().expect("table");
        json(&control::DistributorTransition {
            state: match (&st.other, st.open) {
                (None, _) => control::DistributorPhase::Idle,
                (Some(_), false) => control::DistributorPhase::Switched,
                (Some(_), true) => control::DistributorPhase::Open,
            },
            version: t.version(),
            checksum: file::checksum(t),
            previous_version: st.other.as_ref().map(|p| p.version()),
            previous_checksum: st.other.as_ref().map(file::checksum),
            moved_buckets: st.other.as_ref().map(|_| 10),
            remembered_flows: 0,
            overflows: 0,
            pinned_flows: None,
            pins_refused: None,
            recovering: None,
            failed_over: None,
        })
    };
    match what {
        "GET /healthz" => (200, "ok".into()),
        "GET /metrics" => (200, String::new()),
        "GET /table?key=include" => (200, file::render(&cur)),
        "GET /table/previous?key=include" => match &st.other {
            Some(p) => (200, file::render(p)),
            None => (404, "none".into()),
        },
        "GET /transition" => (200, dstate(st)),
        "POST /transition/switch" => {
            let t = file::parse(body).expect("switch body is a table");
            if id(&t) != id(&cur) {
                st.other = Some(cur);
                st.table = Some(t);
                st.open = false;
            }
            (200, dstate(st))
        }
        "POST /transition/open" => {
            st.open = st.other.is_some();
            (200, dstate(st))
        }
        "GET /table/history" => {
            let mut ids: Vec<control::TableId> = st.history.iter().map(id).collect();
            ids.reverse();
            (200, json(&ids))
        }
        w if w.starts_with("GET /table/history/") => {
            let v: u64 = w["GET /table/history/".len()..]
                .trim_end_matches("?key=include")
                .parse()
                .unwrap_or(0);
            match st.history.iter().find(|t| t.version() == v) {
                Some(t) => (200, file::render(t)),
                None => (404, "not in the history".into()),
            }
        }
        "POST /transition/commit" => {
            if let Some(prev) = st.other.take() {
                st.history.retain(|t| t.version() != prev.version());
                st.history.push(prev);
                st.history.push(cur.clone());
            }
            (
                200,
                json(&control::CommitAnswer {
                    table: id(&cur),
                    persist_error: None,
                    pins_refused: Some(0),
                }),
            )
        }
        "POST /transition/abort" => {
            let aborted = st.other.is_some();
            if let Some(p) = st.other.take() {
                st.table = Some(p);
            }
            let t = st.table.as_ref().expect("table");
            (
                200,
                json(&control::AbortAnswer {
                    table: id(t),
                    aborted,
                }),
            )
        }
        _ => (404, "not found".into()),
    }
}

/// A TM's answer to `what` (the semantics of tmd's admin endpoint).
fn tm(st: &mut State, what: &str, body: &str, moving: u64) -> (u16, String) {
    let cur = st.table.clone().expect("table");
    let tstate = |st: &State, moving: u64| {
        let t = st.table.as_ref().expect("table");
        json(&control::TmTransition {
            phase: if st.other.is_some() {
                control::TmPhase::Prepared
            } else {
                control::TmPhase::Idle
            },
            current: t.version(),
            current_checksum: file::checksum(t),
            next: st.other.as_ref().map(|n| n.version()),
            next_checksum: st.other.as_ref().map(file::checksum),
            connections_in_moved_buckets: st.other.as_ref().map(|_| moving),
            ports_in_moved_buckets: st.other.as_ref().map(|_| moving),
        })
    };
    match what {
        "GET /healthz" => (200, "ok".into()),
        "GET /metrics" => (200, String::new()),
        "GET /table?key=include" => (200, file::render(&cur)),
        "GET /transition" => (200, tstate(st, moving)),
        "GET /transition/ports" => (200, "[[\"10.20.0.100\", 4242]]".to_string()),
        "GET /transition/pins" => {
            // One UDP session, both sides, on a port of its own.
            let t = st.other.as_ref().unwrap_or(&cur);
            (
                200,
                json(&control::api::TmPins {
                    tm: st.tm_id,
                    table: id(t),
                    flows: vec![
                        control::api::PinnedFlow(
                            17,
                            "203.0.113.9:40000".parse().expect("addr"),
                            "198.51.100.10:53".parse().expect("addr"),
                            30_000,
                        ),
                        control::api::PinnedFlow(
                            17,
                            "10.2.0.5:53".parse().expect("addr"),
                            "10.20.0.100:4343".parse().expect("addr"),
                            30_000,
                        ),
                    ],
                    ports: vec![control::api::HeldPort(
                        "10.20.0.100".parse().expect("addr"),
                        4343,
                    )],
                }),
            )
        }
        "POST /transition/prepare" => {
            let req: control::PrepareRequest = serde_json::from_str(body).expect("prepare body");
            st.other = Some(file::parse(&req.table).expect("a table"));
            (200, tstate(st, 3))
        }
        "POST /transition/commit" => {
            if let Some(n) = st.other.take() {
                st.table = Some(n);
            }
            let t = st.table.as_ref().expect("table");
            (
                200,
                json(&control::CommitAnswer {
                    table: id(t),
                    persist_error: None,
                    pins_refused: None,
                }),
            )
        }
        "POST /transition/abort" => {
            let aborted = st.other.take().is_some();
            (
                200,
                json(&control::AbortAnswer {
                    table: id(&cur),
                    aborted,
                }),
            )
        }
        _ => (404, "not found".into()),
    }
}

fn fake_node(name: &str, script: Script, log: Log) -> String {
    let server = tiny_http::Server::http("127.0.0.1:0").expect("bind");
    let addr = server.server_addr().to_ip().expect("ip addr");
    let name = name.to_string();
    let is_tm = name.starts_with("tm");
    std::thread::spawn(move || {
        let mut polls = 0usize;
        let mut failed_once: Vec<String> = Vec::new();
        let mut st = State {
            table: Some(file::parse(&script.table).expect("script table")),
            tm_id: name
                .strip_prefix("tm")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0),
            ..State::default()
        };
        for mut req in server.incoming_requests() {
            let what = format!("{} {}", req.method(), req.url());
            let mut body = String::new();
            let _ = req.as_reader().read_to_string(&mut body);
            log.lock()
                .expect("log")
                .push((name.clone(), what.clone(), body.clone()));
            if let Some(&(_, ms)) = script.slow.iter().find(|(w, _)| *w == what) {
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
            let once = failed_once
                .iter()
                .all(|w| *w != what)
                .then(|| script.fail_once.iter().find(|(w, _)| *w == what))
                .flatten()
                .map(|&(_, c)| c);
            if once.is_some() {
                failed_once.push(what.clone());
            }
            let code = script
                .fail
                .iter()
                .find(|(w, _)| *w == what)
                .map_or(once.unwrap_or(200), |&(_, c)| c);
            let (code, text) = if code != 200 {
                (code, "scripted failure".to_string())
            } else if is_tm {
                let prepared = st.other.is_some();
                match (&script.state_override, what.as_str()) {
                    (Some((c, t)), "GET /transition") if prepared => (*c, t.clone()),
                    _ => {
                        let m = if what == "GET /transition" && prepared {
                            polls += 1;
                            script.moving.get(polls - 1).copied().unwrap_or(0)
                        } else {
                            0
                        };
                        tm(&mut st, &what, &body, m)
                    }
                }
            } else {
                distributor(&mut st, &what, &body)
            };
            let _ = req.respond(tiny_http::Response::from_string(text).with_status_code(code));
        }
    });
    format!("http://{addr}")
}

fn table() -> AllocationTable {
    testkit::table(4, HashKey::from_bytes([6; 16]), 3, Profile::Uniform)
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
    cluster_with(
        name,
        "drain_window_s = 5\npoll_ms = 20\ntimeout_ms = 2000\n",
        script,
    )
}

fn cluster_with(name: &str, settings: &str, script: impl Fn(&str) -> Script) -> Cluster {
    let dir = std::env::temp_dir().join(format!("stdctl-cluster-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let log: Log = Arc::default();
    let mut text = String::from(settings);
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
        state_override: None,
        slow: Vec::new(),
        fail_once: Vec::new(),
    }
}

/// A cluster whose every node runs `t` and otherwise answers normally.
fn running(name: &str, t: &AllocationTable) -> Cluster {
    let text = file::render(t);
    cluster(name, move |n| Script {
        table: text.clone(),
        ..normal(n)
    })
}

impl Cluster {
    /// The table `node` was switched to.
    fn switched(&self, node: &str) -> AllocationTable {
        file::parse(
            &self
                .body_of(node, "POST /transition/switch")
                .expect("switched"),
        )
        .expect("table")
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
    fn last_body_of(&self, node: &str, what: &str) -> Option<String> {
        self.log
            .lock()
            .expect("log")
            .iter()
            .rev()
            .find(|(n, w, _)| n == node && w == what)
            .map(|(_, _, b)| b.clone())
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
    // Every TM's pins reach every distributor at the open and the commit;
    // each TM's commit holds the other TMs' pinned ports.
    for d in ["front", "back"] {
        for step in ["open", "commit"] {
            let body = c
                .body_of(d, &format!("POST /transition/{step}"))
                .expect("a body");
            let req: control::api::StepRequest =
                serde_json::from_str(&body).expect("a step request");
            let pins = req.pins.expect("pins");
            assert_eq!(
                pins.iter().map(|p| p.tm).collect::<Vec<_>>(),
                vec![0, 1, 2],
                "{d} {step}: {body}"
            );
            assert!(pins.iter().all(|p| p.flows.len() == 2), "{body}");
        }
    }
    let body = c.body_of("tm1", "POST /transition/commit").expect("a body");
    let req: control::api::StepRequest = serde_json::from_str(&body).expect("a step request");
    assert_eq!(req.pins, None, "{body}");
    assert_eq!(
        req.held.map(|h| h.len()),
        Some(2),
        "tm0's and tm2's port: {body}"
    );
    assert!(out.contains("6 flows pinned to their old owners"), "{out}");
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
        err.contains("tm1: prepare: 500") && err.contains("rolled back"),
        "{err}"
    );
    // A 500 may come after the change: tm1 is rolled back too.
    assert_eq!(
        c.posts(),
        vec![
            p("tm0", "prepare"),
            p("tm1", "prepare"),
            p("tm0", "abort"),
            p("tm1", "abort")
        ]
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
    assert!(err.contains("back: switch: 409"), "{err}");
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
    let pushed = c.switched("front");
    assert_eq!(pushed.version(), 5);
    assert_eq!(pushed.counts(0)[1], 0, "tm1 drained");
    let min = allocation::rebalance::minimum_moves(&table().counts(0), &pushed.counts(0));
    assert_eq!(
        min,
        table().counts(0)[1] as usize,
        "only tm1's buckets move"
    );

    // Readmit against a cluster running the drained table.
    let c2 = running("readmit", &pushed);
    let o = stdctl(&["tm", "readmit", "1", "--cluster", &c2.file()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let back = c2.switched("back");
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
    // Both members hold 10.20.0.100:4242: listed once.
    assert_eq!(joining["held"], serde_json::json!([["10.20.0.100", 4242]]));
    assert_eq!(
        file::parse(joining["table"].as_str().expect("table")).expect("table"),
        back
    );
    let member: control::PrepareRequest = serde_json::from_str(
        &c2.body_of("tm0", "POST /transition/prepare")
            .expect("prepared"),
    )
    .expect("json");
    assert_eq!(
        (member.table, member.held),
        (file::render(&back), None),
        "members get the table, no held ports"
    );
    assert!(
        back.counts(0).iter().all(|&n| (1365..=1366).contains(&n)),
        "{:?}",
        back.counts(0)
    );
    // Readmitting a TM in service, or draining a drained one, is refused.
    let c3 = running("drained", &pushed);
    let o = stdctl(&["tm", "drain", "1", "--cluster", &c3.file()]);
    assert_eq!(o.status.code(), Some(1));
    let o = stdctl(&["tm", "readmit", "0", "--cluster", &c3.file()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(c3.posts().is_empty());
}

/// tm1 and tm2 in group "tls" (TCP 443), tm0 in the default group.
fn partitioned() -> AllocationTable {
    testkit::partitioned(&table(), &[1, 2], vec![testkit::tcp_rule("443")])
}

#[test]
fn drain_readmit_rebalance_and_status_work_in_any_group() {
    let t = partitioned();
    let c = running("groups", &t);
    let o = stdctl(&["tm", "drain", "tm2", "--cluster", &c.file()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pushed = c.switched("front");
    assert_eq!(pushed.counts(1)[2], 0, "tm2 drained");
    assert_eq!(
        pushed.counts(1)[1],
        4096,
        "its group's other TM takes its buckets"
    );
    assert_eq!(
        pushed.counts(0),
        t.counts(0),
        "the default group is untouched"
    );

    // Readmit it against a cluster running the drained table.
    let c2 = running("groups-readmit", &pushed);
    let o = stdctl(&["tm", "readmit", "tm2", "--cluster", &c2.file()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let back = c2.switched("front");
    assert_eq!((back.counts(1)[1], back.counts(1)[2]), (2048, 2048));
    assert_eq!(back.counts(0), t.counts(0));

    // Rebalance one group by name; an unknown group is one clear line.
    let o = stdctl(&[
        "rebalance",
        "--cluster",
        &c.file(),
        "--group",
        "tls",
        "--profile",
        "gaussian",
        "--dry-run",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = stdctl(&[
        "rebalance",
        "--cluster",
        &c.file(),
        "--group",
        "nope",
        "--profile",
        "uniform",
        "--dry-run",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("no group named 'nope'"), "{err}");

    // Status (after the readmit): each TM with its group, shares of its group's table.
    let o = stdctl(&["status", "--cluster", &c2.file(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let tms = v["tms"].as_array().expect("tms");
    let by_id = |id: u64| tms.iter().find(|x| x["tm_id"] == id).expect("tm");
    assert_eq!(by_id(0)["group"], "default");
    assert_eq!(by_id(0)["target"], 1.0);
    assert_eq!(by_id(2)["group"], "tls");
    assert_eq!(by_id(2)["target"], 0.5);
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
    assert_eq!(v["table"]["version"], 4);
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

fn next_table(c: &Cluster) -> String {
    let next = table()
        .rebalance(0, &Profile::Rayleigh { sigma: None })
        .expect("rebalance")
        .table;
    let path = c.dir.join("next.toml");
    file::save(&path, &next).expect("save");
    path.display().to_string()
}

/// (label, tm1's GET /transition answer while prepared, its slow requests).
type UnknownCase = (&'static str, Option<(u16, String)>, Vec<(String, u64)>);

#[test]
fn a_tm_of_unknown_state_is_never_counted_as_drained() {
    let settings = "drain_window_s = 1\npoll_ms = 50\ntimeout_ms = 400\n";
    let count_as_text = "{\"phase\":\"prepared\",\"current\":4,\"current_checksum\":\"x\",\"next\":5,\"next_checksum\":\"y\",\"connections_in_moved_buckets\":\"0\"}";
    let cases: Vec<UnknownCase> = vec![
        ("500", Some((500, "boom".into())), vec![]),
        ("garbage", Some((200, "not json".into())), vec![]),
        ("empty", Some((200, "{}".into())), vec![]),
        ("text-count", Some((200, count_as_text.into())), vec![]),
        ("timeout", None, vec![("GET /transition".into(), 700)]),
    ];
    for (label, state_override, slow) in cases {
        let c = cluster_with(&format!("unknown-{label}"), settings, |n| Script {
            state_override: if n == "tm1" {
                state_override.clone()
            } else {
                None
            },
            slow: if n == "tm1" { slow.clone() } else { vec![] },
            ..normal(n)
        });
        let path = next_table(&c);
        let o = stdctl(&["push", &path, "--cluster", &c.file()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{label}: {err}");
        assert!(
            err.contains("the state of tm1 is unknown") && err.contains("nothing committed"),
            "{label}: {err}"
        );
        let posts = c.posts();
        assert!(
            !posts
                .iter()
                .any(|(_, w)| w.ends_with("commit") || w.ends_with("abort")),
            "{label}: left switched, neither committed nor aborted: {posts:?}"
        );
        assert!(posts.contains(&p("back", "open")), "{label}");
    }
}

#[test]
fn push_force_commits_past_an_unknown_node_and_a_second_push_resumes() {
    let settings = "drain_window_s = 1\npoll_ms = 50\ntimeout_ms = 400\n";
    let c = cluster_with("force", settings, |n| Script {
        state_override: (n == "tm2").then(|| (200, "{}".to_string())),
        ..normal(n)
    });
    let path = next_table(&c);
    let o = stdctl(&["push", &path, "--cluster", &c.file(), "--force", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(
        v["unknown_at_commit"].as_array().map(Vec::len),
        Some(1),
        "{v}"
    );
    assert!(c.posts().contains(&p("tm2", "commit")));

    // Stopped by an unknown node, then pushed again once it answers: resumed.
    let c = cluster_with("resume", settings, |n| Script {
        state_override: (n == "tm0").then(|| (500, "down".to_string())),
        ..normal(n)
    });
    let path = next_table(&c);
    let o = stdctl(&["push", &path, "--cluster", &c.file()]);
    assert_eq!(o.status.code(), Some(1));
    // `stdctl transition resume` finds the table itself (another operator,
    // without the file): the first distributor is switched to it.
    let o = stdctl(&["status", "--cluster", &c.file()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("open") && out.contains("prepared"), "{out}");
    let o = stdctl(&[
        "transition",
        "resume",
        "--cluster",
        &c.file(),
        "--force",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["resumed"], true, "{v}");
    assert_eq!(v["from_version"], 4, "{v}");
    assert_eq!(v["to_version"], 5, "{v}");
    // Nothing left to resume.
    let o = stdctl(&["transition", "resume", "--cluster", &c.file()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no transition to resume: front runs version 5"),
        "{err}"
    );
}

#[test]
fn a_timed_out_prepare_is_rolled_back_and_unreachable_nodes_are_named() {
    let settings = "drain_window_s = 1\npoll_ms = 20\ntimeout_ms = 300\nattempts = 2\n";
    // tm1's prepare times out (it may have been carried out): rolled back too.
    let c = cluster_with("prepare-timeout", settings, |n| Script {
        slow: if n == "tm1" {
            vec![("POST /transition/prepare".into(), 600)]
        } else {
            vec![]
        },
        ..normal(n)
    });
    let path = next_table(&c);
    let o = stdctl(&["push", &path, "--cluster", &c.file()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("every node that may have changed was rolled back"),
        "{err}"
    );
    let posts = c.posts();
    assert!(
        posts.contains(&p("tm0", "abort")) && posts.contains(&p("tm1", "abort")),
        "{posts:?}"
    );

    // back fails to open and cannot be aborted: named, never "all rolled back".
    let c = cluster_with("abort-fails", settings, |n| Script {
        fail: if n == "back" {
            vec![
                ("POST /transition/open".into(), 500),
                ("POST /transition/abort".into(), 503),
            ]
        } else {
            vec![]
        },
        ..normal(n)
    });
    let path = next_table(&c);
    let o = stdctl(&["push", &path, "--cluster", &c.file()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("could not be: back: 503"),
        "names the node not rolled back: {err}"
    );
    let aborts = c
        .posts()
        .iter()
        .filter(|(n, w)| n == "back" && w.ends_with("abort"))
        .count();
    assert_eq!(aborts, 2, "retried");
    for n in ["front", "tm0", "tm1", "tm2"] {
        assert!(c.posts().contains(&p(n, "abort")), "{n} rolled back");
    }
}

#[test]
fn status_flags_a_tm_running_another_table_of_the_same_version() {
    let other = table()
        .rebalance(0, &Profile::Rayleigh { sigma: None })
        .expect("rebalance")
        .table
        .with_version(4);
    let c = cluster("status-mismatch", |n| Script {
        table: if n == "tm1" {
            file::render(&other)
        } else {
            file::render(&table())
        },
        ..normal(n)
    });
    let o = stdctl(&["status", "--cluster", &c.file(), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["problems"], 1, "{v}");
    let tm1 = &v["nodes"][3];
    assert_eq!(tm1["name"], "tm1");
    assert!(
        tm1["problems"][0]
            .as_str()
            .is_some_and(|p| p.contains(&file::checksum(&other)) && p.contains("not the cluster's")),
        "{tm1}"
    );
    let text = stdctl(&["status", "--cluster", &c.file()]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("PROBLEM"));
}

#[test]
fn an_unfinished_commit_is_finished_by_a_second_push_and_abort_refuses_to_split() {
    let settings = "drain_window_s = 1\npoll_ms = 20\ntimeout_ms = 1000\nattempts = 1\n";
    let c = cluster_with("commit-unfinished", settings, |n| Script {
        fail_once: if n == "tm2" {
            vec![("POST /transition/commit".into(), 500)]
        } else {
            vec![]
        },
        ..normal(n)
    });
    let path = next_table(&c);
    let o = stdctl(&["push", &path, "--cluster", &c.file()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("tm2: commit: 500") && err.contains("committed: front, back, tm0, tm1"),
        "{err}"
    );
    // The distributors committed, tm2 is still prepared: aborting would split.
    let o = stdctl(&["abort", "--cluster", &c.file()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("would split the cluster"), "{err}");
    assert!(!c.posts().iter().any(|(_, w)| w.ends_with("abort")));
    // Pushing the same table again finishes it.
    let o = stdctl(&["push", &path, "--cluster", &c.file(), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(
        (v["resumed"].as_bool(), v["from_version"].as_u64()),
        (Some(true), Some(4)),
        "{v}"
    );
    let commits = c
        .posts()
        .iter()
        .filter(|(n, w)| n == "tm2" && w.ends_with("commit"))
        .count();
    assert_eq!(commits, 2);
    // Nothing left to do: a third push says so.
    let o = stdctl(&["push", &path, "--cluster", &c.file()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not newer than the running version 5"));
    // With retries, one failed commit does not stop a push.
    let c = cluster("commit-retried", |n| Script {
        fail_once: if n == "tm1" {
            vec![("POST /transition/commit".into(), 503)]
        } else {
            vec![]
        },
        ..normal(n)
    });
    let path = next_table(&c);
    let o = stdctl(&["push", &path, "--cluster", &c.file()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn the_cluster_file_takes_stdctl_environment_overrides_and_names_a_bad_one() {
    let c = cluster("env", normal);
    // An override that breaks the file is named.
    let o = Command::new(env!("CARGO_BIN_EXE_stdctl"))
        .args(["status", "--cluster", &c.file()])
        .env("STDCTL_TIMEOUT_MS", "soon")
        .output()
        .expect("run stdctl");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("STDCTL_TIMEOUT_MS"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    // A good one applies: the drain window of 0 s commits at once.
    let path = next_table(&c);
    let o = Command::new(env!("CARGO_BIN_EXE_stdctl"))
        .args(["push", &path, "--cluster", &c.file(), "--json"])
        .env("STDCTL_DRAIN_WINDOW_S", "0")
        .output()
        .expect("run stdctl");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert!(
        v["moving_at_commit"].as_u64() > Some(0),
        "no drain wait: {v}"
    );
}

#[test]
fn rollback_puts_the_previous_committed_contents_back_as_a_new_version() {
    let c = cluster("rollback", normal);
    // Nothing committed yet: no history to go back to.
    let o = stdctl(&["rollback", "--cluster", &c.file()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("front: no committed table older than the running version 4"),
        "{err}"
    );
    let v4 = table();
    let v5 = v4
        .rebalance(
            0,
            &Profile::Gaussian {
                mean: None,
                sigma: None,
            },
        )
        .expect("rebalance")
        .table;
    let path = c.dir.join("v5.toml");
    file::save(&path, &v5).expect("save");
    let o = stdctl(&["push", &path.display().to_string(), "--cluster", &c.file()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = stdctl(&["rollback", "--cluster", &c.file(), "--to", "5"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--to 5: the cluster runs version 5"));
    let o = stdctl(&["rollback", "--cluster", &c.file()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains(
            "rolled back to the contents of version 4: installed table version 6 (from 5)"
        ),
        "{out}"
    );
    // Through the whole protocol, with version 4's buckets as version 6.
    let v6 = v4.clone().with_version(6);
    assert_eq!(
        c.last_body_of("back", "POST /transition/switch"),
        Some(file::render(&v6))
    );
    let last: Vec<(String, String)> = c.posts().into_iter().skip(12).collect();
    assert_eq!(last.len(), 12, "{last:?}");
    assert_eq!(last[0], p("tm0", "prepare"));
    assert_eq!(last[11], p("tm2", "commit"));
}
