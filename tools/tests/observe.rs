//! `stdctl capture` and `stdctl explain` against scripted nodes: the capture's bytes arrive whole and its summary is read from them; a cut stream, a refusal and bad arguments are named; explain's owner, self-source ports and reply check come from what each node reports, and every inconsistency between nodes fails it by name.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use allocation::{file, AllocationTable, Flow, HashKey, Profile};
use control::api::{ServerSide, SnatAddress, TmSnat};

fn pad(v: &mut Vec<u8>) {
    while v.len() % 4 != 0 {
        v.push(0);
    }
}

fn block(ty: u32, body: &[u8]) -> Vec<u8> {
    let len = (12 + body.len()) as u32;
    let mut b = ty.to_le_bytes().to_vec();
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(body);
    b.extend_from_slice(&len.to_le_bytes());
    b
}

fn comment(text: &str) -> Vec<u8> {
    let mut o = 1u16.to_le_bytes().to_vec();
    o.extend_from_slice(&(text.len() as u16).to_le_bytes());
    o.extend_from_slice(text.as_bytes());
    pad(&mut o);
    o.extend_from_slice(&[0, 0, 0, 0]);
    o
}

/// A pcapng as stdd writes one: a section, an interface, two frames (one
/// kernel, one worker), the closing statistics.
fn capture() -> Vec<u8> {
    let mut shb = 0x1a2b_3c4du32.to_le_bytes().to_vec();
    shb.extend_from_slice(&[1, 0, 0, 0]);
    shb.extend_from_slice(&(-1i64).to_le_bytes());
    let mut out = block(0x0a0d_0d0a, &shb);
    out.extend(block(1, &[1, 0, 0, 0, 0, 1, 0, 0]));
    for path in ["kernel", "worker"] {
        let frame = [0xaau8; 60];
        let mut epb = vec![0u8; 12];
        epb.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        epb.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        epb.extend_from_slice(&frame);
        pad(&mut epb);
        epb.extend(comment(&format!(
            "path={path} branch=endpoint action=to_tm tm=tm1 tm_id=1 group=default bucket=9 table=3"
        )));
        out.extend(block(6, &epb));
    }
    let mut isb = vec![0u8; 12];
    isb.extend(comment("std capture: frames=2 kernel=1 worker=1 dropped_kernel_ring=0 dropped_worker_ring=0 dropped_reader=0"));
    out.extend(block(5, &isb));
    out
}

/// How a fake node answers a path: status and body.
type Answer = Box<dyn Fn(&str) -> (u16, Vec<u8>) + Send>;

/// A node answering by `answer`; the URLs it was asked, in order.
fn node(answer: Answer) -> (String, Arc<Mutex<Vec<String>>>) {
    let server = tiny_http::Server::http("127.0.0.1:0").expect("bind");
    let addr = server.server_addr().to_ip().expect("ip");
    let asked: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = Arc::clone(&asked);
    std::thread::spawn(move || {
        for req in server.incoming_requests() {
            log.lock().expect("log").push(req.url().to_string());
            let (code, body) = answer(req.url());
            let _ = req.respond(tiny_http::Response::from_data(body).with_status_code(code));
        }
    });
    (format!("http://{addr}"), asked)
}

fn distributor(
    t: &AllocationTable,
    capture_answer: (u16, Vec<u8>),
) -> (String, Arc<Mutex<Vec<String>>>) {
    let text = file::render(t);
    let state = serde_json::to_vec(&control::DistributorTransition::new(
        control::DistributorPhase::Idle,
        t,
        None,
        None,
        0,
        0,
    ))
    .expect("json");
    node(Box::new(move |url| {
        match url.split('?').next().unwrap_or("") {
            // Only asked with ?key=include does the table carry its key.
            "/table" if url.ends_with("?key=include") => (200, text.clone().into_bytes()),
            "/transition" => (200, state.clone()),
            "/capture" => capture_answer.clone(),
            _ => (404, b"none".to_vec()),
        }
    }))
}

/// A TM: its table, and its GET /snat as `snat` says.
fn tm(t: &AllocationTable, snat: TmSnat) -> String {
    let text = file::render(t);
    let body = serde_json::to_vec(&snat).expect("json");
    node(Box::new(move |url| match url {
        "/table?key=include" => (200, text.clone().into_bytes()),
        "/snat" => (200, body.clone()),
        _ => (404, b"none".to_vec()),
    }))
    .0
}

fn snat(id: u32, version: u64) -> TmSnat {
    TmSnat {
        tm_id: id,
        table_version: version,
        range: "1024-65535".into(),
        addresses: vec![SnatAddress {
            address: "10.20.0.100".parse().expect("addr"),
            in_use: 3,
            free: 16000,
        }],
        servers: vec![ServerSide {
            vs: "web".into(),
            pool: "p".into(),
            protocol: 6,
            server: "10.20.0.10:80".parse().expect("addr"),
        }],
    }
}

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir(name: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("stdctl-observe-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("dir");
    Dir(d)
}

/// A cluster file: distributors (name, url), TMs (id, url).
fn cluster(d: &Dir, dists: &[(&str, String)], tms: &[(u32, String)]) -> String {
    let mut text = String::from("timeout_ms = 1000\n");
    for (n, u) in dists {
        text += &format!("\n[[distributor]]\nname = \"{n}\"\nadmin = \"{u}\"\n");
    }
    for (id, u) in tms {
        text += &format!("\n[[tm]]\nid = {id}\nadmin = \"{u}\"\n");
    }
    let f = d.0.join("cluster.toml");
    std::fs::write(&f, text).expect("write");
    f.display().to_string()
}

fn stdctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stdctl"))
        .args(args)
        .output()
        .expect("run stdctl")
}

fn table(key: u8) -> AllocationTable {
    testkit::table(4, HashKey::from_bytes([key; 16]), 3, Profile::Uniform)
}

#[test]
fn a_capture_arrives_byte_for_byte_with_its_summary_and_the_filters_in_the_request() {
    let d = dir("capture");
    let t = table(6);
    let (front, asked) = distributor(&t, (200, capture()));
    let c = cluster(&d, &[("front", front)], &[(0, "http://127.0.0.1:9".into())]);
    let out_file = d.0.join("out.pcapng");
    let out = stdctl(&[
        "capture",
        "--cluster",
        &c,
        "--node",
        "front",
        "--seconds",
        "1",
        "--tm",
        "tm1",
        "--filter",
        "tcp port 80",
        "--sample",
        "0.5",
        "-w",
        &out_file.display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&out_file).expect("file"), capture());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("front: 2 frames (1 steered in the kernel, 1 by the workers)"),
        "{said}"
    );
    assert!(
        said.contains("dropped_reader=0"),
        "the closing statistics: {said}"
    );
    let url = asked.lock().expect("log").last().cloned().expect("asked");
    for part in [
        "seconds=1",
        "sample=0.5",
        "tm=tm1",
        "filter=tcp%20port%2080",
    ] {
        assert!(url.contains(part), "{part} in {url}");
    }
    // To standard output: the bytes there, the summary on standard error.
    let out = stdctl(&["capture", "--cluster", &c, "--node", "front", "-w", "-"]);
    assert!(out.status.success());
    assert_eq!(out.stdout, capture());
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 frames"));
}

#[test]
fn a_cut_stream_a_refusal_and_bad_arguments_are_named() {
    let d = dir("refused");
    let t = table(6);
    let mut cut = capture();
    cut.truncate(cut.len() - 10);
    let (cutting, _) = distributor(&t, (200, cut));
    let (busy, _) = distributor(&t, (409, b"a capture is running already".to_vec()));
    let c = cluster(
        &d,
        &[("cutting", cutting), ("busy", busy)],
        &[(0, "http://127.0.0.1:9".into())],
    );
    let w = d.0.join("x.pcapng").display().to_string();
    for (args, says) in [
        (vec!["--node", "cutting"], "ended inside a block"),
        (vec!["--node", "busy"], "a capture is running already"),
        (vec!["--node", "nosuch"], "no distributor 'nosuch'"),
        (vec!["--node", "busy", "--seconds", "0"], "--seconds 0"),
        (vec!["--node", "busy", "--sample", "2"], "--sample 2"),
    ] {
        let mut all = vec!["capture", "--cluster", &c, "-w", &w];
        all.extend(args.iter());
        let out = stdctl(&all);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// The flow the explain tests ask about, and its owner under `t`.
fn flow_owner(t: &AllocationTable) -> u32 {
    let f = Flow::with_ports(
        6,
        "10.10.0.1".parse::<IpAddr>().expect("addr"),
        40000,
        "10.10.0.100".parse::<IpAddr>().expect("addr"),
        80,
    );
    t.tms()[usize::from(t.steer(&f).tm)].id
}

fn explain(c: &str) -> Output {
    stdctl(&[
        "explain",
        "--cluster",
        c,
        "10.10.0.1:40000",
        "10.10.0.100:80",
    ])
}

#[test]
fn explain_names_the_owner_its_self_source_ports_and_checks_its_replies_on_every_distributor() {
    let d = dir("explain");
    let t = table(6);
    let owner = flow_owner(&t);
    let (front, _) = distributor(&t, (404, vec![]));
    let (back, _) = distributor(&t, (404, vec![]));
    let tms: Vec<(u32, String)> = (0..3).map(|k| (k, tm(&t, snat(k, t.version())))).collect();
    let c = cluster(&d, &[("front", front), ("back", back)], &tms);
    let out = explain(&c);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text.matches(&format!("→ tm{owner} (id {owner})")).count(),
        2,
        "{text}"
    );
    assert!(
        text.contains(&format!("TM tm{owner} (id {owner}), running table 4")),
        "{text}"
    );
    assert!(text.contains("SNAT 10.20.0.100:"), "{text}");
    assert!(text.contains("back to this TM"), "{text}");
    // Its first self-source ports are the ones its table gives it.
    let set = allocation::SelfPorts::build(
        &t,
        "10.20.0.100".parse().expect("addr"),
        t.tm_index_by_id(owner).expect("index"),
        "1024-65535".parse().expect("range"),
    )
    .expect("self ports");
    let first: Vec<u16> = set.iter().take(4).collect();
    assert!(text.contains(&format!("first {first:?}")), "{text}");
}

#[test]
fn explain_fails_by_name_when_the_nodes_disagree() {
    let t = table(6);
    let owner = flow_owner(&t);
    // A table (another key) that gives the flow to another TM.
    let other = (7..200u8)
        .map(table)
        .find(|o| flow_owner(o) != owner)
        .expect("a key that moves the flow");
    // (case, the owner's table and GET /snat, what the failure names)
    type Case<'a> = (
        &'a str,
        Box<dyn Fn() -> (AllocationTable, TmSnat) + 'a>,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "split",
            Box::new(|| (t.clone(), snat(owner, 4))),
            "different TMs",
        ),
        (
            "lying",
            Box::new(|| (t.clone(), snat((owner + 1) % 3, 4))),
            "answers as TM",
        ),
        (
            "stale",
            Box::new(|| (t.clone(), snat(owner, 3))),
            "GET /snat for table 3",
        ),
        (
            "other-table",
            Box::new(|| (t.clone().with_version(9), snat(owner, 9))),
            "runs table 9, no distributor does",
        ),
    ];
    for (name, tm_side, says) in cases {
        let d = dir(name);
        let (front, _) = distributor(&t, (404, vec![]));
        let back_table = if name == "split" {
            other.clone()
        } else {
            t.clone()
        };
        let (back, _) = distributor(&back_table, (404, vec![]));
        let (own, s) = tm_side();
        let tms: Vec<(u32, String)> = (0..3)
            .map(|k| {
                (
                    k,
                    if k == owner {
                        tm(&own, s.clone())
                    } else {
                        tm(&t, snat(k, 4))
                    },
                )
            })
            .collect();
        let c = cluster(&d, &[("front", front), ("back", back)], &tms);
        let out = explain(&c);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(err.contains(says), "{name}: {err}");
    }
}
