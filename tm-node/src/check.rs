//! `tmd check-config`: every problem a configuration would meet when tmd starts — the file itself, its table, its TM id in the table, the self-source ports of its SNAT addresses, the replies of every server side steering home, the table file's mode — one line each, without binding anything.

use std::path::Path;

use crate::config::{NodeConfig, Settings as _};
use allocation::{AllocationTable, TmIndex};

use crate::snat::Snat;

/// What tmd needs from its table before it serves.
#[derive(Debug)]
pub struct Ready {
    /// The table.
    pub table: AllocationTable,
    /// This TM in it.
    pub tm: TmIndex,
    /// Its self-source ports.
    pub snat: Snat,
}

/// The table `cfg` names, this TM in it, its self-source ports, and the
/// rule that every server side's replies steer back to it: what `tmd run`
/// refuses to start without. `Err`: every problem, one line each.
pub fn ready(cfg: &NodeConfig) -> Result<Ready, Vec<String>> {
    let table = allocation::file::load(&cfg.table)
        .map_err(|e| vec![format!("table {}: {e}", cfg.table.display())])?;
    let Some(tm) = table.tm_index_by_id(cfg.tm_id) else {
        return Err(vec![format!(
            "tm_id: TM id {} is not in table version {}",
            cfg.tm_id,
            table.version()
        )]);
    };
    let mut problems = Vec::new();
    let snat = Snat::new(&table, tm, &cfg.snat_addresses, cfg.snat_ports)
        .map_err(|e| problems.push(format!("snat: {e}")))
        .ok();
    let server_sides = cfg.server_sides();
    let sides: Vec<_> = server_sides.iter().map(|s| s.side()).collect();
    if let Err(e) = crate::snat::check_replies(&table, None, cfg.tm_id, &cfg.snat_addresses, &sides)
    {
        problems.push(format!("table {}: {e}", cfg.table.display()));
    }
    match snat {
        Some(snat) if problems.is_empty() => Ok(Ready { table, tm, snat }),
        _ => Err(problems),
    }
}

/// Checks the configuration at `path`.
pub fn check(path: &Path) -> cli_common::cli::CheckOutcome {
    let cfg = NodeConfig::load(path).map_err(|e| vec![e.to_string()])?;
    let mut summary = format!(
        "{}: TM id {}, {} virtual servers, {} pools",
        path.display(),
        cfg.tm_id,
        cfg.virtual_servers.len(),
        cfg.pools.len()
    );
    let mut problems = match ready(&cfg) {
        Err(p) => p,
        Ok(Ready { table, tm, snat }) => {
            summary += &format!(", table version {}", table.version());
            // A TM without a bucket (drained, failed over, waiting for a
            // group) has no self-source port, rightly.
            let serving = table.buckets_of(tm) > 0;
            if !serving {
                summary +=
                    " (no bucket in this table: no self-source port until one gives it some)";
            }
            let mut problems = Vec::new();
            for (addr, _, free) in snat.usage() {
                summary += &format!(", {addr}: {free} self-source ports");
                if free == 0 && serving {
                    problems.push(format!(
                        "snat {addr}: no self-source port for TM {} in {}",
                        cfg.tm_id, cfg.snat_ports
                    ));
                }
            }
            problems
        }
    };
    if let Some(p) = cli_common::secret::readable_by_all(&cfg.table, "the hash key") {
        problems.push(format!("table {p}"));
    }
    problems.extend(cfg.admin.problems());
    if problems.is_empty() {
        Ok(summary)
    } else {
        Err(problems)
    }
}
