//! stdctl: the operator's tool for allocation tables (offline: build, show, verify, diff, lookup, selfports, rebalance) and for running clusters (status, push, rebalance, drain, readmit).

mod cli;
mod cluster;
mod observe;
mod report;
mod top;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;

use allocation::rules::proto;
use allocation::{
    file, AllocationTable, Flow, GroupSpec, HashKey, MacAddr, PortRange, Profile, SelfPorts, Tm,
    TmIndex,
};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;

use cli::{Cli, Command, GroupCmd, ProfileArgs, ProfileName, TableCmd, TmCmd};
use report::Out;

fn main() -> ExitCode {
    let cli: Cli = match cli_common::cli::parse("stdctl") {
        Ok(c) => c,
        Err(code) => return code,
    };
    let out = Out { json: cli.json };
    cli_common::cli::finish("stdctl", run(cli.command, &out))
}

fn run(cmd: Command, out: &Out) -> Result<()> {
    match cmd {
        Command::Generate(a) => cli_common::generate::generate::<Cli>(&a),
        Command::Table(TableCmd::New(a)) => table_new(a, out),
        Command::Table(TableCmd::Show { file }) => {
            let t = load(&file)?;
            out.show(&t, &file.display().to_string());
            Ok(())
        }
        Command::Table(TableCmd::Verify { file }) => {
            let t = load(&file)?;
            out.emit(
                json!({"file": file.display().to_string(), "valid": true, "version": t.version(), "checksum": file::checksum(&t), "tms": t.tms().len(), "groups": t.groups().len()}),
                || {
                    format!(
                        "{}: valid (version {}, {} TMs, {} group(s), {})",
                        file.display(),
                        t.version(),
                        t.tms().len(),
                        t.groups().len(),
                        file::checksum(&t)
                    )
                },
            );
            Ok(())
        }
        Command::Table(TableCmd::Diff { old, new }) => {
            let (a, b) = (load(&old)?, load(&new)?);
            out.diff(&a, &b);
            Ok(())
        }
        Command::Table(TableCmd::Seal { file }) => {
            let text = file::read(&file).map_err(|e| anyhow!(e))?;
            let (t, status) =
                file::parse_unverified(&text).with_context(|| format!("{}", file.display()))?;
            file::save(&file, &t).map_err(|e| anyhow!(e))?;
            let was = match status {
                file::Checksum::Valid => "checksum was already valid".to_string(),
                file::Checksum::Mismatch { stored, .. } => format!("replaced checksum {stored}"),
            };
            out.emit(
                json!({"file": file.display().to_string(), "checksum": file::checksum(&t)}),
                || {
                    format!(
                        "{}: sealed with {} ({was})",
                        file.display(),
                        file::checksum(&t)
                    )
                },
            );
            Ok(())
        }
        Command::Lookup(a) => lookup(a, out),
        Command::Selfports(a) => selfports(a, out),
        Command::Rebalance(a) => rebalance(a, out),
        Command::Tm(TmCmd::Add(a)) => {
            let t = load(&a.table)?;
            let group = resolve_group(&t, a.group.as_deref())?;
            let id =
                a.id.unwrap_or_else(|| t.tms().iter().map(|tm| tm.id).max().map_or(0, |m| m + 1));
            let mac: MacAddr = a.mac.parse()?;
            let tm = Tm {
                id,
                name: a.name,
                mac,
                weight: a.weight,
                group,
            };
            let change = t.add_tm(tm)?;
            write_new(&a.output, &change.table, a.force)?;
            out.change("added TM", &t, &change, group, &a.output);
            Ok(())
        }
        Command::Tm(TmCmd::Remove(a)) => {
            let t = load(&a.table)?;
            let k = resolve_tm(&t, &a.tm)?;
            let group = t.tms()[usize::from(k)].group;
            let change = t.remove_tm(k)?;
            write_new(&a.output, &change.table, a.force)?;
            out.change("removed TM", &t, &change, group, &a.output);
            Ok(())
        }
        Command::Status(a) => {
            let c = cluster::Cluster::load(&a.cluster)?;
            let v = cluster::status(&c);
            out.emit(serde_json::to_value(&v)?, || cluster::status_text(&v));
            Ok(())
        }
        Command::Push(a) => {
            let c = cluster::Cluster::load(&a.cluster.cluster)?;
            let next = load(&a.table)?;
            let summary = cluster::push(&c, &next, out.json, a.force)?;
            out.emit(serde_json::to_value(&summary)?, || pushed_text(&summary));
            Ok(())
        }
        Command::Rollback(a) => {
            let c = cluster::Cluster::load(&a.cluster.cluster)?;
            let (back_to, summary) = cluster::rollback(&c, a.to, out.json, a.force)?;
            let mut v = serde_json::to_value(&summary)?;
            v["rolled_back_to"] = serde_json::to_value(&back_to)?;
            out.emit(v, || {
                format!(
                    "rolled back to the contents of version {}: {}",
                    back_to.version,
                    pushed_text(&summary)
                )
            });
            Ok(())
        }
        Command::Transition(cli::TransitionCmd::Resume { cluster: a, force }) => {
            let c = cluster::Cluster::load(&a.cluster)?;
            let next = cluster::unfinished(&c)?;
            let summary = cluster::push(&c, &next, out.json, force)?;
            out.emit(serde_json::to_value(&summary)?, || pushed_text(&summary));
            Ok(())
        }
        Command::Transition(cli::TransitionCmd::Abort(a)) | Command::Abort(a) => {
            let c = cluster::Cluster::load(&a.cluster)?;
            cluster::abort(&c, out.json)?;
            out.emit(json!({"aborted": true}), || {
                "every node is out of its transition".to_string()
            });
            Ok(())
        }
        Command::Persistence(a) => {
            let c = cluster::Cluster::load(&a.cluster.cluster)?;
            let all = cluster::persistence(&c, a.tm.as_deref())?;
            out.emit(serde_json::to_value(&all)?, || {
                cluster::persistence_text(&all)
            });
            if let Some(bad) = all.iter().find(|t| t.error.is_some()) {
                bail!("{}: {}", bad.tm, bad.error.as_deref().unwrap_or(""));
            }
            Ok(())
        }
        Command::Capture(a) => observe::capture(&a, out),
        Command::Explain(a) => observe::explain(&a, out),
        Command::Top(a) => top::top(&a, out),
        Command::Plot(a) => top::plot(&a, out),
        Command::Group(GroupCmd::Add(a)) => group_add(a, out),
        Command::Tm(TmCmd::Drain(a)) => tm_cluster(a, true, out),
        Command::Tm(TmCmd::Readmit(a)) => tm_cluster(a, false, out),
        Command::Failover(a) => {
            let t = load(&a.table)?;
            let failed =
                a.tm.iter()
                    .map(|s| resolve_tm(&t, s))
                    .collect::<Result<Vec<_>>>()?;
            let change = t.failover(&failed)?;
            if let Some(path) = &a.output {
                write_new(path, &change.table, a.force)?;
            }
            let group = t.tms()[usize::from(failed[0])].group;
            out.failover(&t, &change, group, &failed, a.output.as_deref());
            Ok(())
        }
    }
}

fn load(path: &Path) -> Result<AllocationTable> {
    file::load(path)
        .map_err(|e| anyhow!(e))
        .with_context(|| format!("cannot use table {}", path.display()))
}

fn write_new(path: &Path, t: &AllocationTable, force: bool) -> Result<()> {
    if path.exists() && !force {
        bail!("{} exists (use --force to overwrite)", path.display());
    }
    file::save(path, t).map_err(|e| anyhow!(e))
}

/// One `--rule`: comma-separated `protocol=…`, `ports=…`, `prefix=…`.
fn parse_rule(text: &str) -> Result<allocation::Rule> {
    let mut r = allocation::Rule {
        protocol: None,
        ports: None,
        prefix: None,
    };
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| {
            anyhow!("--rule '{text}': '{part}' is not key=value (protocol=, ports=, prefix=)")
        })?;
        let bad = |e: String| anyhow!("--rule '{text}': {k} = '{v}': {e}");
        match k.trim() {
            "protocol" => {
                r.protocol = Some(allocation::rules::Protocol(
                    allocation::rules::proto::parse(v.trim())
                        .ok_or_else(|| bad("not tcp, udp, icmp, icmpv6 or 0-255".into()))?,
                ))
            }
            "ports" => r.ports = Some(v.trim().parse().map_err(|e| bad(format!("{e}")))?),
            "prefix" => r.prefix = Some(v.trim().parse().map_err(|e| bad(format!("{e}")))?),
            other => bail!("--rule '{text}': unknown key '{other}' (protocol, ports, prefix)"),
        }
    }
    if r.is_empty() {
        bail!("--rule '{text}': sets no criterion");
    }
    Ok(r)
}

fn group_add(a: cli::GroupAddArgs, out: &Out) -> Result<()> {
    let t = load(&a.table)?;
    let members = a
        .tms
        .iter()
        .map(|s| resolve_tm(&t, s))
        .collect::<Result<Vec<_>>>()?;
    let rules = a
        .rules
        .iter()
        .map(|r| parse_rule(r))
        .collect::<Result<Vec<_>>>()?;
    let hash = match a.hash.as_str() {
        "endpoint" => allocation::HashMode::Endpoint,
        "address" => allocation::HashMode::Address {
            v4_prefix: 32,
            v6_prefix: 128,
        },
        other => bail!("--hash '{other}': endpoint or address"),
    };
    let profile = profile_from(&a.profile, members.len())?;
    let spec = allocation::GroupSpec {
        name: a.name.clone(),
        rules,
        hash,
        profile,
    };
    let change = t.with_new_group(spec, &members)?;
    write_new(&a.output, &change.table, a.force)?;
    let g = change.table.groups().len() - 1;
    out.emit(
        json!({"file": a.output.display().to_string(), "version": change.table.version(), "group": a.name, "tms": a.tms, "moved_buckets": change.moves.len(), "checksum": file::checksum(&change.table)}),
        || {
            format!(
                "{}: group '{}' of {} TM(s) ({}), {} bucket(s) of the other groups moved; table version {}",
                a.output.display(),
                a.name,
                change.table.members(g).len(),
                a.tms.join(", "),
                change.moves.len(),
                change.table.version()
            )
        },
    );
    Ok(())
}

/// A TM by id (a number) or by name.
fn resolve_tm(t: &AllocationTable, s: &str) -> Result<TmIndex> {
    let by_id = s.parse::<u32>().ok().and_then(|id| t.tm_index_by_id(id));
    by_id.or_else(|| t.tm_index_by_name(s)).ok_or_else(|| {
        anyhow!(
            "no TM with id or name '{s}' (the table has {} TMs)",
            t.tms().len()
        )
    })
}

/// A group by name; the default group when none is named.
fn resolve_group(t: &AllocationTable, name: Option<&str>) -> Result<usize> {
    match name {
        Some(name) => t
            .group_index(name)
            .ok_or_else(|| anyhow!("no group named '{name}'")),
        None => Ok(0),
    }
}

/// The profile named on the command line, for `n` TMs.
fn profile_from(a: &ProfileArgs, n: usize) -> Result<Profile> {
    let only = |flag: &str, allowed: &[ProfileName]| -> Result<()> {
        if !allowed.contains(&a.profile) {
            bail!(
                "--{flag} does not apply to the {} profile",
                format!("{:?}", a.profile).to_lowercase()
            );
        }
        Ok(())
    };
    if a.mean.is_some() {
        only("mean", &[ProfileName::Gaussian])?;
    }
    if a.sigma.is_some() {
        only("sigma", &[ProfileName::Gaussian, ProfileName::Rayleigh])?;
    }
    if a.weights.is_some() {
        only("weights", &[ProfileName::Weighted, ProfileName::Custom])?;
    }
    let p = match a.profile {
        ProfileName::Uniform => Profile::Uniform,
        ProfileName::Weighted => Profile::Weighted,
        ProfileName::Gaussian => Profile::Gaussian {
            mean: a.mean,
            sigma: a.sigma,
        },
        ProfileName::Rayleigh => Profile::Rayleigh { sigma: a.sigma },
        ProfileName::Custom => {
            let weights = a
                .weights
                .clone()
                .ok_or_else(|| anyhow!("the custom profile needs --weights W,W,…"))?;
            if weights.len() != n {
                bail!("--weights lists {} values for {n} TMs", weights.len());
            }
            Profile::Custom { weights }
        }
    };
    // Check the parameters now, for a clear message.
    p.targets(&vec![1; n], allocation::TABLE_SIZE as u32)?;
    Ok(p)
}

/// Integer capacities from `--weights` (weighted profile).
fn capacities(a: &ProfileArgs, n: usize) -> Result<Option<Vec<u32>>> {
    if a.profile != ProfileName::Weighted {
        return Ok(None);
    }
    let Some(w) = &a.weights else { return Ok(None) };
    if w.len() != n {
        bail!("--weights lists {} values for {n} TMs", w.len());
    }
    w.iter()
        .map(|&x| {
            if x.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&x) {
                Ok(x as u32)
            } else {
                Err(anyhow!(
                    "weighted profile: --weights are TM capacities, whole numbers >= 0 (got {x})"
                ))
            }
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn table_new(a: cli::NewArgs, out: &Out) -> Result<()> {
    if a.tms == 0 || a.tms > allocation::table::MAX_TMS {
        bail!("--tms must be 1 to {}", allocation::table::MAX_TMS);
    }
    let profile = profile_from(&a.profile, a.tms)?;
    let caps = capacities(&a.profile, a.tms)?.unwrap_or_else(|| vec![1; a.tms]);
    let base: MacAddr = a.mac_base.parse()?;
    let key = match &a.key {
        Some(k) => k.parse::<HashKey>()?,
        None => HashKey::random().context("cannot read random bytes for the hash key")?,
    };
    let tms = (0..a.tms)
        .map(|i| Tm {
            id: i as u32,
            name: format!("tm{i}"),
            mac: base.offset(i as u64),
            weight: caps[i],
            group: 0,
        })
        .collect();
    let t = AllocationTable::new(
        a.table_version,
        key,
        tms,
        vec![GroupSpec::default_group(profile)],
    )?;
    write_new(&a.output, &t, a.force)?;
    out.emit(
        json!({"file": a.output.display().to_string(), "version": t.version(), "tms": t.tms().len(), "profile": t.groups()[0].profile.name(), "checksum": file::checksum(&t)}),
        || {
            format!(
                "wrote {}: version {}, {} TMs, profile {}, {}",
                a.output.display(),
                t.version(),
                t.tms().len(),
                t.groups()[0].profile,
                file::checksum(&t)
            )
        },
    );
    Ok(())
}

/// `ADDR:PORT`, `[V6]:PORT`, or a bare address.
fn endpoint(s: &str) -> Result<(IpAddr, Option<u16>)> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok((sa.ip(), Some(sa.port())));
    }
    let bare = s.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>()
        .map(|ip| (ip, None))
        .map_err(|_| anyhow!("'{s}' is not an endpoint (ADDR:PORT, [V6ADDR]:PORT or ADDR)"))
}

/// The flow named by two endpoint arguments and a protocol.
pub(crate) fn flow_arg(src: &str, dst: &str, protocol: &str) -> Result<Flow> {
    let protocol =
        proto::parse(protocol).ok_or_else(|| anyhow!("unknown protocol '{protocol}'"))?;
    let (src, sp) = endpoint(src)?;
    let (dst, dp) = endpoint(dst)?;
    let ported = matches!(protocol, proto::TCP | proto::UDP | 132 /* SCTP */);
    Ok(match (sp, dp) {
        (Some(s), Some(d)) if ported => Flow::with_ports(protocol, src, s, dst, d),
        (None, None) if !ported => Flow::without_ports(protocol, src, dst),
        _ if ported => bail!("{} needs ports on both endpoints", proto::name(protocol)),
        _ => bail!(
            "{} has no ports: give bare addresses",
            proto::name(protocol)
        ),
    })
}

fn lookup(a: cli::LookupArgs, out: &Out) -> Result<()> {
    let t = load(&a.table)?;
    let flow = flow_arg(&a.src, &a.dst, &a.protocol)?;
    out.lookup(&t, &flow);
    Ok(())
}

fn selfports(a: cli::SelfportsArgs, out: &Out) -> Result<()> {
    let t = load(&a.table)?;
    let addr: IpAddr = a
        .addr
        .parse()
        .map_err(|_| anyhow!("--addr '{}' is not an IP address", a.addr))?;
    let range: PortRange = a.range.parse()?;
    let k = resolve_tm(&t, &a.tm)?;
    let set = SelfPorts::build(&t, addr, k, range)?;
    out.selfports(&t, &set, a.above, a.count);
    Ok(())
}

fn pushed_text(v: &cluster::Pushed) -> String {
    let mut s = format!(
        "installed table version {} (from {}): {} buckets moved, drained in {:.1} s",
        v.to_version, v.from_version, v.moved_buckets, v.drain_s
    );
    if v.moving_at_commit > 0 {
        s += &format!(
            ", {} connections were still in moved buckets at commit",
            v.moving_at_commit
        );
    }
    if v.pinned_at_commit > 0 {
        s += &format!(", {} flows pinned to their old owners", v.pinned_at_commit);
    }
    if !v.unknown_at_commit.is_empty() {
        s += &format!(
            "; committed with --force while the state of {} was unknown",
            v.unknown_at_commit.join("; ")
        );
    }
    s
}

/// `tm drain` / `tm readmit` on a running cluster.
fn tm_cluster(a: cli::TmClusterArgs, drain: bool, out: &Out) -> Result<()> {
    let c = cluster::Cluster::load(&a.cluster.cluster)?;
    let running = cluster::running_table(&c)?;
    let k = resolve_tm(&running, &a.tm)?;
    // The TM's own group: its buckets go to (or come from) its group's TMs.
    let g = running.tms()[usize::from(k)].group;
    let mut out_of_service = cluster::out_of_service(&running, g);
    let buckets = running.buckets_of(k);
    if drain {
        if buckets == 0 {
            bail!("TM {} has no bucket already", a.tm);
        }
        out_of_service.push(k);
    } else {
        if buckets > 0 {
            bail!("TM {} is in service ({buckets} buckets)", a.tm);
        }
        out_of_service.retain(|&m| m != k);
    }
    let profile = running.groups()[g].profile.clone();
    let change = cluster::plan_change(&running, g, &profile, &out_of_service)?;
    let what = if drain { "drain" } else { "readmit" };
    if a.dry_run {
        out.rebalance(&running, &change, g, None);
        return Ok(());
    }
    if !out.json {
        crate::report::say(&format!(
            "{what} {}: {} buckets move, table version {} → {}",
            a.tm,
            change.moves.len(),
            running.version(),
            change.table.version()
        ));
    }
    let summary = cluster::push(&c, &change.table, out.json, false)?;
    out.emit(serde_json::to_value(&summary)?, || pushed_text(&summary));
    Ok(())
}

fn rebalance(a: cli::RebalanceArgs, out: &Out) -> Result<()> {
    if let Some(path) = &a.cluster {
        let c = cluster::Cluster::load(path)?;
        let running = cluster::running_table(&c)?;
        let g = resolve_group(&running, a.group.as_deref())?;
        let profile = profile_from(&a.profile, running.members(g).len())?;
        // Failed and drained TMs stay out; readmit brings them back.
        let change =
            cluster::plan_change(&running, g, &profile, &cluster::out_of_service(&running, g))?;
        // With -o: the table pushed (or, with --dry-run, that would be).
        if let Some(path) = &a.output {
            write_new(path, &change.table, a.force)?;
        }
        if a.dry_run || !out.json {
            out.rebalance(&running, &change, g, a.output.as_deref());
        }
        if a.dry_run {
            return Ok(());
        }
        let summary = cluster::push(&c, &change.table, out.json, false)?;
        out.emit(serde_json::to_value(&summary)?, || pushed_text(&summary));
        return Ok(());
    }
    let Some(table) = &a.table else {
        bail!("--table or --cluster is required");
    };
    let t = load(table)?;
    let g = resolve_group(&t, a.group.as_deref())?;
    let members = t.members(g);
    let profile = profile_from(&a.profile, members.len())?;
    let base = match capacities(&a.profile, members.len())? {
        // New capacities for a weighted rebalance: same table, updated weights.
        Some(caps) => {
            let mut tms = t.tms().to_vec();
            for (&m, &c) in members.iter().zip(&caps) {
                tms[usize::from(m)].weight = c;
            }
            AllocationTable::from_parts(t.version(), *t.key(), tms, t.groups().to_vec())?
        }
        None => t.clone(),
    };
    let change = base.rebalance(g, &profile)?;
    if let Some(path) = &a.output {
        write_new(path, &change.table, a.force)?;
    }
    out.rebalance(&t, &change, g, a.output.as_deref());
    Ok(())
}
