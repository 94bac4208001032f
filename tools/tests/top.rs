//! `stdctl top` and `stdctl plot` against scripted nodes whose counters grow between scrapes: the shares, rates, states and SVG come from the metrics' real text; bad arguments are one line.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A distributor whose `std_tm_packets_total` grows by `steps[k]` for TM k
/// at every scrape (TM 0 and 1 of group `default`, 2048 buckets each; TM 2
/// with none), that probes TM 1 as down when `tm1_down`.
fn distributor(steps: [u64; 3], tm1_down: bool) -> String {
    let server = tiny_http::Server::http("127.0.0.1:0").expect("bind");
    let addr = server.server_addr().to_ip().expect("ip");
    let scrapes = Arc::new(AtomicU64::new(0));
    let table = testkit::table(
        7,
        allocation::HashKey::from_bytes([1; 16]),
        3,
        allocation::Profile::Uniform,
    );
    std::thread::spawn(move || {
        for req in server.incoming_requests() {
            let text = match req.url() {
                "/metrics" => {
                    let n = scrapes.fetch_add(1, Ordering::Relaxed) + 1;
                    let mut m = String::from("# TYPE std_tm_packets_total counter\n");
                    for (k, s) in steps.iter().enumerate() {
                        m += &format!(
                            "std_tm_packets_total{{tm_id=\"{k}\",tm=\"tm{k}\"}} {}\n",
                            s * n
                        );
                    }
                    for (k, b) in [2048, 2048, 0].iter().enumerate() {
                        m += &format!(
                            "std_tm_buckets{{group=\"default\",tm=\"tm{k}\",tm_id=\"{k}\"}} {b}\n"
                        );
                    }
                    m += &format!(
                        "std_tm_up{{tm_id=\"0\"}} 1\nstd_tm_up{{tm_id=\"1\"}} {}\n",
                        u8::from(!tm1_down)
                    );
                    m += &format!("std_drops_total{{reason=\"malformed\"}} {}\n", 10 * n);
                    m += "std_drops_total{reason=\"truncated\"} 3\nstd_table_version 7\nstd_failovers_total 1\nstd_failed_tms 0\nstd_capture_armed 0\n";
                    m
                }
                "/transition" => serde_json::to_string(&control::DistributorTransition::new(
                    control::DistributorPhase::Idle,
                    &table,
                    None,
                    None,
                    0,
                    0,
                ))
                .expect("json"),
                _ => String::new(),
            };
            let _ = req.respond(tiny_http::Response::from_string(text));
        }
    });
    format!("http://{addr}")
}

/// A TM with `open` connections and a refusal count growing by 5 a scrape.
fn tm(open: u64) -> String {
    let server = tiny_http::Server::http("127.0.0.1:0").expect("bind");
    let addr = server.server_addr().to_ip().expect("ip");
    std::thread::spawn(move || {
        let mut n = 0;
        for req in server.incoming_requests() {
            n += 1;
            let text = format!(
                "tmd_connections_active{{vs=\"web\"}} {open}\ntmd_refused_total{{vs=\"web\",reason=\"limit\"}} {}\n",
                5 * n
            );
            let _ = req.respond(tiny_http::Response::from_string(text));
        }
    });
    format!("http://{addr}")
}

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Two distributors (TM 0 gets 3 frames for each of TM 1's), TM 0 and 1
/// answering, TM 2 at a closed port.
fn cluster(name: &str, tm1_down: bool) -> (Dir, String) {
    let dir = std::env::temp_dir().join(format!("stdctl-top-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let text = format!(
        "timeout_ms = 500\n\n[[distributor]]\nname = \"front\"\nadmin = \"{}\"\n\n[[distributor]]\nname = \"back\"\nadmin = \"{}\"\n\n[[tm]]\nid = 0\nadmin = \"{}\"\n\n[[tm]]\nid = 1\nadmin = \"{}\"\n\n[[tm]]\nid = 2\nadmin = \"http://127.0.0.1:{closed}\"\n",
        distributor([300, 100, 0], tm1_down),
        distributor([600, 200, 0], tm1_down),
        tm(7),
        tm(2),
    );
    let file = dir.join("cluster.toml");
    std::fs::write(&file, text).expect("cluster file");
    let f = file.display().to_string();
    (Dir(dir), f)
}

fn stdctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stdctl"))
        .args(args)
        .output()
        .expect("run stdctl")
}

#[test]
fn top_shows_each_tms_share_of_its_group_against_its_target_and_the_nodes_state() {
    let (_d, c) = cluster("json", false);
    let out = stdctl(&[
        "--json",
        "top",
        "--cluster",
        &c,
        "--count",
        "2",
        "--interval",
        "0.2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let views: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a view per line"))
        .collect();
    assert_eq!(views.len(), 2, "--count 2: two views");
    for v in &views {
        let tms = v["tms"].as_array().expect("tms");
        let row = |id: u64| tms.iter().find(|t| t["id"] == id).expect("tm row");
        // 900 of every 1,200 frames a scrape go to TM 0: 75 %, its target 50 %.
        assert!((row(0)["share"].as_f64().expect("share") - 75.0).abs() < 1e-6);
        assert!((row(1)["share"].as_f64().expect("share") - 25.0).abs() < 1e-6);
        assert_eq!(row(0)["target"], 50.0);
        assert_eq!(row(2)["target"], 0.0);
        assert_eq!(row(0)["state"], "up");
        assert_eq!(row(0)["connections"], 7);
        assert_eq!(row(1)["connections"], 2);
        // TM 2: no bucket, and its endpoint does not answer: down, not out.
        assert_eq!(row(2)["state"], "down");
        assert!(row(2)["connections"].is_null());
        let secs = v["seconds"].as_f64().expect("seconds");
        assert!((0.15..2.0).contains(&secs), "{secs}");
        let front = &v["distributors"][0];
        assert_eq!(front["name"], "front");
        assert_eq!(front["table_version"], 7);
        assert_eq!(front["transition"], "idle");
        assert!((front["frames_per_s"].as_f64().expect("fps") * secs - 400.0).abs() < 1e-3);
        // Only the reason that grew; the constant one is not a rate.
        assert_eq!(front["drop_reasons"].as_array().expect("reasons").len(), 1);
        assert_eq!(front["drop_reasons"][0][0], "malformed");
        assert!(v["disagreements"].as_array().expect("list").is_empty());
    }
    let out = stdctl(&["top", "--cluster", &c, "--count", "1", "--interval", "0.2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("group default"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("tm0") && l.contains("75.0 %") && l.contains("(off target)")),
        "{text}"
    );
    assert!(
        !text.contains('\x1b'),
        "no screen control codes when not on a terminal"
    );
}

#[test]
fn top_marks_a_tm_the_distributors_probe_as_down() {
    let (_d, c) = cluster("down", true);
    let out = stdctl(&[
        "--json",
        "top",
        "--cluster",
        &c,
        "--count",
        "1",
        "--interval",
        "0.2",
    ]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let t1 = v["tms"]
        .as_array()
        .expect("tms")
        .iter()
        .find(|t| t["id"] == 1)
        .cloned()
        .expect("tm1");
    assert_eq!(
        t1["state"], "down",
        "its endpoint answers, the probes do not"
    );
}

#[test]
fn plot_writes_an_svg_with_a_share_and_a_target_line_per_tm_in_service() {
    let (d, c) = cluster("plot", false);
    let svg = d.0.join("shares.svg");
    let out = stdctl(&[
        "plot",
        "--cluster",
        &c,
        "--seconds",
        "1",
        "--interval",
        "0.25",
        "-o",
        &svg.display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("2 TMs"),
        "TM 2 had no bucket and no frame: left out: {said}"
    );
    assert!(
        said.contains("25.0 points (tm0)") || said.contains("25.0 points (tm1)"),
        "{said}"
    );
    let doc = std::fs::read_to_string(&svg).expect("svg");
    assert!(doc.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert_eq!(doc.matches("class=\"share\"").count(), 2);
    assert_eq!(doc.matches("class=\"target\"").count(), 2);
    assert!(doc.trim_end().ends_with("</svg>"));
    assert!(
        doc.contains("tm0 (75.0 %)"),
        "the legend holds the last share"
    );
}

#[test]
fn bad_arguments_and_a_dead_cluster_are_one_line() {
    let (_d, c) = cluster("args", false);
    for (args, says) in [
        (
            vec!["top", "--cluster", &c, "--interval", "0"],
            "--interval 0",
        ),
        (
            vec!["top", "--cluster", &c, "--interval", "NaN"],
            "--interval NaN",
        ),
        (
            vec![
                "plot",
                "--cluster",
                &c,
                "--seconds",
                "0.5",
                "--interval",
                "1",
                "-o",
                "/tmp/x.svg",
            ],
            "--seconds 0.5",
        ),
        (
            vec![
                "top",
                "--cluster",
                "/nonexistent/cluster.toml",
                "--count",
                "1",
            ],
            "cluster file",
        ),
    ] {
        let out = stdctl(&args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: one line: {err}"
        );
    }
    // Nobody answers: nothing to plot, and nothing written.
    let dir = std::env::temp_dir().join(format!("stdctl-top-dead-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let _d = Dir(dir.clone());
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let file = dir.join("cluster.toml");
    std::fs::write(
        &file,
        format!("timeout_ms = 200\n[[distributor]]\nname = \"front\"\nadmin = \"http://127.0.0.1:{closed}\"\n[[tm]]\nid = 0\nadmin = \"http://127.0.0.1:{closed}\"\n"),
    )
    .expect("file");
    let svg = dir.join("none.svg");
    let out = stdctl(&[
        "plot",
        "--cluster",
        &file.display().to_string(),
        "--seconds",
        "0.5",
        "--interval",
        "0.25",
        "-o",
        &svg.display().to_string(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no distributor answered"));
    assert!(!svg.exists());
}
