//! `stdd check-config`: every problem a configuration would meet when stdd starts or runs — the file itself, its table, the restart marker, the ports' interfaces and capture files, the worker CPUs, the table file's mode — one line each, without opening a port.

use std::path::Path;

use cli_common::settings::Settings as _;

use crate::config::{BackendKind, DistributorConfig};

/// Checks the configuration at `path`.
pub fn check(path: &Path) -> cli_common::cli::CheckOutcome {
    let cfg = DistributorConfig::load(path).map_err(|e| vec![e.to_string()])?;
    let mut problems = Vec::new();
    let mut summary = format!(
        "{}: {:?} distributor, backend {:?}, {} ports",
        path.display(),
        cfg.role,
        cfg.backend,
        cfg.ports.len()
    );
    match allocation::file::load(&cfg.table) {
        Err(e) => problems.push(format!("table {}: {e}", cfg.table.display())),
        Ok(t) => {
            summary += &format!(
                ", table version {} ({} TMs, {} groups)",
                t.version(),
                t.tms().len(),
                t.groups().len()
            );
            match crate::recovery::at_start(&cfg.table, &t) {
                Err(e) => problems.push(format!("transition marker: {e}")),
                Ok(Some(s)) => {
                    summary += &format!(
                        "; it would start recovering (stopped switched to table version {}: stdctl transition resume)",
                        s.version()
                    )
                }
                Ok(None) => {}
            }
            if let Err(e) = cfg.plan(t) {
                problems.push(e.to_string());
            }
        }
    }
    if let Some(p) = cli_common::secret::readable_by_all(&cfg.table, "the hash key") {
        problems.push(format!("table {p}"));
    }
    problems.extend(cfg.admin.problems());
    if let Err(e) = cfg.failover.tls.load("failover.tls") {
        problems.push(e.to_string());
    }
    let live = matches!(
        cfg.backend,
        BackendKind::Pcap | BackendKind::Afpacket | BackendKind::Afxdp | BackendKind::Netmap
    );
    for p in &cfg.ports {
        if live {
            if let Some(i) = &p.interface {
                if !Path::new("/sys/class/net").join(i).exists() {
                    problems.push(format!("port {}: no interface {i} on this host", p.name));
                }
            }
        }
        if cfg.backend == BackendKind::PcapFile {
            if let Some(f) = &p.input {
                if let Err(e) = std::fs::File::open(f) {
                    problems.push(format!("port {}: input {}: {e}", p.name, f.display()));
                }
            }
            if let Some(f) = &p.output {
                let dir = f.parent().filter(|d| !d.as_os_str().is_empty());
                if dir.is_some_and(|d| !d.is_dir()) {
                    problems.push(format!(
                        "port {}: output {}: its directory does not exist",
                        p.name,
                        f.display()
                    ));
                }
            }
        }
    }
    let cores: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    for cpu in &cfg.workers.cpus {
        if !cores.is_empty() && !cores.contains(cpu) {
            problems.push(format!(
                "workers.cpus: CPU {cpu} is not one this process may run on ({cores:?})"
            ));
        }
    }
    if problems.is_empty() {
        Ok(summary)
    } else {
        Err(problems)
    }
}
