//! stdd, the distributor daemon: `run` (steer live interfaces or capture files, admin endpoint) and `replay` (check a table against a capture).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use stdd::config::Settings;

/// stdd — the statistical traffic distributor.
#[derive(Debug, Parser)]
#[command(name = "stdd", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Man pages and shell completions (what the package ships).
    #[command(hide = true)]
    Generate(cli_common::generate::GenerateArgs),
    /// Run the distributor: steer frames between the configured ports until
    /// SIGTERM or SIGINT; SIGHUP reloads the configuration's steering
    /// settings and the table.
    Run {
        /// Configuration file (TOML; STD_* environment variables override keys).
        #[arg(long)]
        config: PathBuf,
    },
    /// Check a configuration without starting: the file, its table and
    /// transition marker, the ports' interfaces and capture files, the
    /// worker CPUs, the table file's mode. Exit 0 with a summary, or 1 with
    /// one line per problem.
    CheckConfig {
        /// Configuration file (TOML; STD_* environment variables override keys).
        #[arg(long)]
        config: PathBuf,
    },
    /// Steer every frame of a pcap capture with a table: one capture per TM
    /// and summary.json (packets per TM, branch and drop reason; split flows).
    Replay {
        /// Table file (default with --config: the configuration's table).
        #[arg(long, required_unless_present = "config")]
        table: Option<PathBuf>,
        /// Distributor configuration: its group MAC, cluster addresses and
        /// ports apply, frames keep their MACs. Without it every frame is
        /// taken as arriving on the outside port addressed to the cluster.
        #[arg(long)]
        config: Option<PathBuf>,
        /// With --config: the port the capture was taken on (default: the first outside port).
        #[arg(long, requires = "config")]
        port: Option<String>,
        /// Capture to replay (classic pcap, Ethernet).
        capture: PathBuf,
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Print the summary as JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli: Cli = match cli_common::cli::parse("stdd") {
        Ok(c) => c,
        Err(code) => return code,
    };
    cli_common::cli::finish("stdd", run(cli.command))
}

fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Run { config } => daemon::run(&config),
        Command::Generate(a) => cli_common::generate::generate::<Cli>(&a),
        Command::CheckConfig { config } => {
            cli_common::cli::report_check("stdd", &config, stdd::check::check(&config))
        }
        Command::Replay {
            table,
            config,
            port,
            capture,
            out,
            json,
        } => {
            let cfg = config
                .as_deref()
                .map(stdd::config::DistributorConfig::load)
                .transpose()?;
            let table = match (&table, &cfg) {
                (Some(t), _) => t.clone(),
                (None, Some(c)) => c.table.clone(),
                (None, None) => anyhow::bail!("give --table or --config"),
            };
            let t = allocation::file::load(&table)
                .with_context(|| format!("cannot use table {}", table.display()))?;
            let setup = match &cfg {
                None => distributor::replay::ReplaySetup::assumed(t)?,
                Some(c) => {
                    let ingress = match &port {
                        Some(name) => c
                            .ports
                            .iter()
                            .position(|p| &p.name == name)
                            .with_context(|| format!("--port: no port named '{name}'"))?,
                        None => c
                            .ports
                            .iter()
                            .position(|p| p.kind == stdd::config::PortKindConfig::Outside)
                            .context("the configuration has no outside port")?,
                    };
                    distributor::replay::ReplaySetup {
                        plan: c.plan(t)?,
                        ingress: ingress as u16,
                        to_cluster: false,
                    }
                }
            };
            let input = std::fs::File::open(&capture)
                .with_context(|| format!("cannot open {}", capture.display()))?;
            let s = distributor::replay::replay_with(setup, std::io::BufReader::new(input), &out)
                .with_context(|| format!("replay of {}", capture.display()))?;
            if let Some(t) = &s.truncated_tail {
                eprintln!(
                    "stdd: warning: {} ends inside record {} (at byte offset {}: {} of its {} bytes present); the {} whole records before it were replayed, the cut one was not",
                    capture.display(),
                    t.record,
                    t.offset,
                    t.present,
                    t.expected,
                    t.record
                );
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(());
            }
            println!(
                "replayed {} frames ({} bytes) with table version {}",
                s.frames, s.bytes, s.table_version
            );
            println!(
                "  {:>4} {:>6}  {:<12} {:>10} {:>12}  file",
                "tm", "id", "name", "packets", "bytes"
            );
            for t in &s.tms {
                println!(
                    "  {:>4} {:>6}  {:<12} {:>10} {:>12}  {}",
                    t.index,
                    t.id,
                    t.name,
                    t.packets,
                    t.bytes,
                    out.join(&t.file).display()
                );
            }
            let nonzero = |m: &std::collections::BTreeMap<String, u64>| {
                m.iter()
                    .filter(|(_, &v)| v > 0)
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            println!("branches: {}", nonzero(&s.branches));
            let drops = nonzero(&s.drops);
            println!(
                "drops: {}",
                if drops.is_empty() {
                    "none".to_string()
                } else {
                    drops
                }
            );
            println!(
                "not steered (bridged, answered, to every TM): {}; fragments held at the end: {}",
                s.not_steered, s.held_at_end
            );
            println!(
                "flows: {} seen, {} in both directions, {} split across TMs",
                s.flows.seen, s.flows.both_directions, s.flows.split
            );
            for e in &s.flows.split_examples {
                println!("  split: {e}");
            }
            println!("wrote {}", out.join("summary.json").display());
            Ok(())
        }
    }
}

mod daemon {
    //! The `run` command: threads, signals, reloads.

    use std::path::Path;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use allocation::SharedTable;
    use anyhow::{anyhow, Context, Result};
    use distributor::backend::{PcapBackend, PcapFileBackend};
    use distributor::io::{run_worker, Backend, WorkerShared};
    use stdd::admin::{self, AdminState};
    use stdd::config::{BackendKind, DistributorConfig, Settings};

    /// What a worker thread needs.
    struct WorkerSpawn {
        plan: Arc<SharedTable<distributor::Plan>>,
        stop: Arc<AtomicBool>,
        shared: Arc<WorkerShared>,
        wcfg: distributor::WorkerConfig,
        batch: usize,
        cpu: Option<usize>,
        index: usize,
        tap: Option<distributor::capture::WorkerTap>,
    }

    impl WorkerSpawn {
        /// Starts the worker on its own (optionally pinned) thread, monomorphic in the backend.
        fn start<B: Backend + Send + 'static>(
            self,
            mut backend: B,
        ) -> Result<std::thread::JoinHandle<distributor::Counters>> {
            let WorkerSpawn {
                plan,
                stop,
                shared,
                wcfg,
                batch,
                cpu,
                index,
                tap,
            } = self;
            Ok(std::thread::Builder::new()
                .name(format!("stdd-worker-{index}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
                            log::warn!("could not pin the worker to CPU {cpu}");
                        }
                    }
                    run_worker(&mut backend, &plan, wcfg, batch, &stop, &shared, tap)
                })?)
        }
    }

    fn load(path: &Path) -> Result<(DistributorConfig, distributor::Plan)> {
        let cfg = DistributorConfig::load(path)?;
        let table = allocation::file::load(&cfg.table)
            .with_context(|| format!("cannot use table {}", cfg.table.display()))?;
        let plan = cfg.plan(table)?;
        Ok((cfg, plan))
    }

    /// At start: `plan` recovering, if stdd stopped mid-transition.
    fn recover(cfg: &DistributorConfig, plan: distributor::Plan) -> Result<distributor::Plan> {
        let table = plan.table().clone();
        let Some(switched) =
            stdd::recovery::at_start(&cfg.table, &table).map_err(|e| anyhow!(e))?
        else {
            return Ok(plan);
        };
        let (from, to) = (table.version(), switched.version());
        let plan = plan.recovering(table, switched);
        let buckets = plan.recovery().and_then(|(_, _, n)| n).map_or_else(
            || "every flow the two tables steer differently is".to_string(),
            |n| format!("the {n} buckets they disagree on are"),
        );
        log::warn!(
            "restarted mid-transition (switched from table version {from} to {to}, {}): {buckets} dropped as `recovering` until the coordinator switches and opens this distributor again with the TMs' pins (stdctl transition resume), commits or aborts",
            stdd::recovery::path(&cfg.table).display()
        );
        Ok(plan)
    }

    pub fn run(path: &Path) -> Result<()> {
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
        let (cfg, plan) = load(path)?;
        let plan = recover(&cfg, plan)?;
        log::info!(
            "stdd {:?}: {} ports, table version {} ({} TMs), backend {:?}",
            cfg.role,
            cfg.ports.len(),
            plan.table().version(),
            plan.table().tms().len(),
            cfg.backend
        );
        let plan = Arc::new(SharedTable::new(plan));
        let stop = Arc::new(AtomicBool::new(false));
        let reload = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(sig, Arc::clone(&stop))
                .context("installing signal handlers")?;
        }
        signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&reload))
            .context("installing signal handlers")?;

        // One worker per configured CPU with the afpacket backend (a fan-out
        // group per port spreads flows over them); one otherwise.
        let nworkers = match cfg.backend {
            BackendKind::Afpacket | BackendKind::Afxdp | BackendKind::Netmap => {
                cfg.workers.cpus.len().max(1)
            }
            _ => 1,
        };
        let shared: Vec<Arc<WorkerShared>> = (0..nworkers)
            .map(|_| Arc::new(WorkerShared::default()))
            .collect();
        let server = admin_http::Server::bind(&cfg.admin, admin::limits())?;
        let admin_reloader = server.reloader();
        log::info!(
            "admin endpoint on {}://{}",
            cfg.admin.scheme(),
            cfg.admin.listen
        );
        // The in-kernel steering of the common case (afxdp): its maps exist
        // before the admin endpoint can change the plan.
        let kernel = match cfg.backend {
            BackendKind::Afxdp if cfg.workers.xdp_steer => {
                let interfaces: Vec<Option<&str>> =
                    cfg.ports.iter().map(|p| p.interface.as_deref()).collect();
                let k = distributor::xdp_steer::XdpSteer::new(
                    plan.load().ports(),
                    &interfaces,
                    nworkers as u32,
                )
                .context("creating the in-kernel steering maps (workers.xdp_steer)")?;
                match k.sync(&plan.load()) {
                    Ok(true) => log::info!("in-kernel steering on for the outside ports"),
                    Ok(false) => log::info!("in-kernel steering off for this table (several groups): the workers steer every frame"),
                    Err(e) => return Err(anyhow!("writing the in-kernel steering maps: {e}")),
                }
                Some(Arc::new(k))
            }
            _ => None,
        };
        // The capture tap: a ring per worker, the kernel's ring if it steers.
        let (tap, worker_taps) = distributor::capture::Tap::new(nworkers);
        let capture = distributor::capture::Source {
            tap,
            plan: Arc::clone(&plan),
            kernel: kernel.clone(),
            ports: cfg
                .ports
                .iter()
                .map(|p| distributor::capture::PortName {
                    name: p.name.clone(),
                    ifindex: p
                        .interface
                        .as_deref()
                        .and_then(|i| distributor::afpacket::ifindex(i).ok()),
                })
                .collect(),
            // Off the steering cores: the first CPU no worker is pinned to.
            collector_cpu: (!cfg.workers.cpus.is_empty())
                .then(|| {
                    core_affinity::get_core_ids()
                        .unwrap_or_default()
                        .into_iter()
                        .map(|c| c.id)
                        .find(|c| !cfg.workers.cpus.contains(c))
                })
                .flatten(),
        };
        let mut worker_taps = worker_taps.into_iter();
        let state = Arc::new(AdminState {
            capture: Some(capture),
            kernel: kernel.clone(),
            config: Mutex::new(cfg.clone()),
            plan: Arc::clone(&plan),
            workers: shared.clone(),
            swaps: AtomicU64::new(0),
            reloads: AtomicU64::new(0),
            failover: stdd::failover::FailoverState::default(),
            server: Some(server.stats()),
        });
        state.failover.installed(plan.load().table());
        // The prober runs even with no TM to probe: a reload (SIGHUP) may
        // add some.
        let failover_thread = {
            let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("stdd-failover".into())
                .spawn(move || stdd::failover::run(&state, &stop))?
        };
        let admin_thread = {
            let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("stdd-admin".into())
                .spawn(move || {
                    if let Err(e) = server.serve(admin::handler(state), &stop) {
                        log::error!("admin endpoint stopped: {e}");
                    }
                })?
        };
        let names: Vec<&str> = cfg
            .ports
            .iter()
            .filter_map(|p| p.interface.as_deref())
            .collect();
        // A fan-out group id per port, the same for every worker of this
        // process and unlikely to meet another process's.
        let group_base = (std::process::id() as u16).wrapping_mul(64);
        // The afxdp backend: an XDP program per port, attached for as long as
        // this value lives (to the end of `run`).
        let xdp = match cfg.backend {
            BackendKind::Afxdp => {
                let ports = distributor::afxdp::XdpPorts::attach(
                    &names,
                    nworkers as u32,
                    cfg.workers.xdp_mode,
                    kernel.as_deref(),
                )
                .context("attaching XDP programs (afxdp)")?;
                for (name, native) in ports.native() {
                    log::info!(
                        "{name}: XDP program attached in {} mode",
                        if native { "native" } else { "generic" }
                    );
                }
                Some(ports)
            }
            _ => None,
        };
        let mut worker_threads = Vec::with_capacity(nworkers);
        for (index, shared) in shared.iter().enumerate() {
            let spawn = WorkerSpawn {
                plan: Arc::clone(&plan),
                stop: Arc::clone(&stop),
                shared: Arc::clone(shared),
                wcfg: cfg.worker_config(),
                batch: cfg.workers.batch,
                cpu: cfg.workers.cpus.get(index).copied(),
                index,
                tap: worker_taps.next(),
            };
            worker_threads.push(match cfg.backend {
                BackendKind::Afpacket => spawn.start(
                    distributor::afpacket::AfPacketBackend::open(
                        &names,
                        distributor::afpacket::RingConfig::default(),
                        cfg.workers.poll_ms,
                        (nworkers > 1).then_some(group_base),
                    )
                    .context("opening interfaces (afpacket)")?,
                )?,
                BackendKind::Afxdp => {
                    let ports = xdp
                        .as_ref()
                        .ok_or_else(|| anyhow!("XDP programs not attached"))?;
                    let backend = distributor::afxdp::AfXdpBackend::open(
                        ports,
                        index as u32,
                        cfg.workers.poll_ms,
                        cfg.workers.busy_poll_us,
                    )
                    .with_context(|| format!("opening XDP sockets on queue {index}"))?;
                    log::info!(
                        "worker {index}: XDP sockets on queue {index} ({})",
                        if backend.zerocopy() {
                            "zero-copy"
                        } else {
                            "copy mode"
                        }
                    );
                    spawn.start(backend)?
                }
                #[cfg(feature = "netmap")]
                BackendKind::Netmap => spawn.start(
                    distributor::netmap::NetmapBackend::open(
                        &names,
                        (nworkers > 1).then_some(index as u16),
                        cfg.workers.poll_ms,
                    )
                    .context("opening interfaces (netmap)")?,
                )?,
                #[cfg(not(feature = "netmap"))]
                BackendKind::Netmap => {
                    return Err(anyhow!(
                        "this stdd was built without the netmap backend (cargo feature `netmap`)"
                    ))
                }
                BackendKind::Pcap => spawn.start(
                    PcapBackend::open(&names, Duration::from_micros(200))
                        .context("opening interfaces")?,
                )?,
                BackendKind::PcapFile => {
                    let files: Vec<_> = cfg
                        .ports
                        .iter()
                        .map(|p| (p.input.as_deref(), p.output.as_deref()))
                        .collect();
                    spawn.start(PcapFileBackend::open(&files).context("opening capture files")?)?
                }
            });
        }
        if nworkers > 1 {
            log::info!("{nworkers} workers, flows spread over them by the kernel's fan-out hash");
        }
        let mut ticks = 0u64;
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
            ticks += 1;
            if let Some(k) = &kernel {
                if ticks % 20 == 0 {
                    k.refresh(&plan);
                }
                // One MAC-learning sample a second per queue.
                if ticks % (distributor::xdp_steer::LEARN_EVERY_MS / 100) == 0 {
                    if let Err(e) = k.arm_learning() {
                        log::warn!("in-kernel steering: arming the learning sample: {e}");
                    }
                }
            }
            if reload.swap(false, Ordering::Relaxed) {
                match load(path) {
                    Ok(_) if plan.load().previous().is_some() => log::error!(
                        "SIGHUP: reload refused while a transition is switched: commit or abort it first"
                    ),
                    Ok((new_cfg, new_plan)) => {
                        // A reload never goes back in version: a pushed
                        // table is newer than the file's until the file
                        // is rewritten (commit and PUT write it).
                        let running = plan.load().table().clone();
                        let (file_id, running_id) = (
                            control::TableId::of(new_plan.table()),
                            control::TableId::of(&running),
                        );
                        let new_plan = if file_id.version < running_id.version {
                            log::warn!(
                                "SIGHUP: the table file {} has version {}, older than the running version {}: the running table stays",
                                new_cfg.table.display(),
                                file_id.version,
                                running_id.version
                            );
                            match new_cfg.plan(running) {
                                Ok(p) => p,
                                Err(e) => {
                                    log::error!("SIGHUP: reload refused, the running configuration stays: {e:#}");
                                    continue;
                                }
                            }
                        } else if file_id.version == running_id.version && file_id != running_id {
                            log::error!(
                                "SIGHUP: reload refused, the running configuration stays: the table file {} is version {} with checksum {}, but the running version {} has checksum {}",
                                new_cfg.table.display(),
                                file_id.version,
                                file_id.checksum,
                                running_id.version,
                                running_id.checksum
                            );
                            continue;
                        } else {
                            new_plan
                        };
                        if new_cfg.ports
                            != state
                                .config
                                .lock()
                                .map(|c| c.ports.clone())
                                .unwrap_or_default()
                            || new_cfg.backend != cfg.backend
                        {
                            log::warn!("SIGHUP: port or backend changes need a restart; steering settings and the table are reloaded");
                        }
                        // The admin endpoint's token and TLS files (a
                        // renewed certificate): read again, or the whole
                        // reload is refused.
                        if let Some(Err(e)) = admin_reloader.as_ref().map(|r| r.reload(&new_cfg.admin)) {
                            log::error!("SIGHUP: reload refused, the running configuration stays: admin endpoint: {e}");
                            continue;
                        }
                        state.reloads.fetch_add(1, Ordering::Relaxed);
                        let new_plan = new_cfg.carry_state(new_plan, &plan.load(), &[]);
                        let v = new_plan.table().version();
                        state.failover.installed(new_plan.table());
                        state.change_plan(|| plan.replace(new_plan));
                        state.swaps.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut c) = state.config.lock() {
                            *c = new_cfg;
                        }
                        log::info!("SIGHUP: configuration reloaded, table version {v}");
                    }
                    Err(e) => log::error!(
                        "SIGHUP: reload refused, the running configuration stays: {e:#}"
                    ),
                }
            }
        }
        log::info!("stopping");
        let mut counters = distributor::Counters::default();
        for t in worker_threads {
            counters.add(&t.join().map_err(|_| anyhow!("a worker thread panicked"))?);
        }
        let _ = admin_thread.join();
        let _ = failover_thread.join();
        let steered: u64 = counters.tm_packets.iter().sum();
        let dropped: u64 = counters.drops.iter().sum();
        log::info!("stopped: {steered} frames steered to TMs, {dropped} dropped");
        Ok(())
    }
}
