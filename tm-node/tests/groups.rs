//! A partitioned table on the real `tmd`: a TM whose servers' replies would land in another group whatever the port is refused at start, in one line naming the virtual server, the pool, the server, the SNAT address and both groups.

use std::process::Command;

/// TMs 0, 1 in the default group, 2, 3 in "tls" with `rules`.
fn partitioned(rules: Vec<allocation::Rule>) -> allocation::AllocationTable {
    testkit::partitioned(&testkit::uniform(4), &[2, 3], rules)
}

#[test]
fn a_tm_whose_replies_land_in_another_group_is_refused_at_start() {
    let dir = std::env::temp_dir().join(format!("tmd-groups-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    allocation::file::save(
        dir.join("table.toml"),
        &partitioned(vec![testkit::tcp_rule("443")]),
    )
    .expect("table");
    let tm_id = testkit::uniform(4).tms()[2].id;
    std::fs::write(
        dir.join("tmd.toml"),
        format!(
            "tm_id = {tm_id}\ntable = \"table.toml\"\nsnat_addresses = [\"127.0.0.30\"]\n\n\
             [[pool]]\nname = \"app\"\nservers = [{{ address = \"127.0.0.1:8080\" }}]\n\n\
             [[virtual_server]]\nname = \"web-tls\"\nlisten = \"127.0.0.1:8443\"\npool = \"app\"\n"
        ),
    )
    .expect("config");
    let o = Command::new(env!("CARGO_BIN_EXE_tmd"))
        .arg("run")
        .arg("--config")
        .arg(dir.join("tmd.toml"))
        .output()
        .expect("run tmd");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let last = err.trim_end().lines().last().unwrap_or("");
    for want in [
        "'web-tls'",
        "'app'",
        "127.0.0.1:8080",
        "127.0.0.30",
        "group 'default'",
        "group 'tls'",
    ] {
        assert!(last.contains(want), "missing {want}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
