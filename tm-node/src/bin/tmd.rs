//! tmd, the traffic-manager daemon: TCP virtual servers whose server-side connections use self-source ports.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use clap::{Parser, Subcommand};
use tm_node::config::{NodeConfig, Settings};
use tm_node::proxy::{self, Pool, VirtualServer, VsStats};

/// tmd — a traffic manager of a statistical traffic distributor cluster.
#[derive(Debug, Parser)]
#[command(name = "tmd", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Man pages and shell completions (what the package ships).
    #[command(hide = true)]
    Generate(cli_common::generate::GenerateArgs),
    /// Serve the configured virtual servers until SIGTERM or SIGINT, then
    /// drain; SIGHUP reloads the admin endpoint's token and TLS files.
    Run {
        /// Configuration file (TOML; TMD_* environment variables override keys).
        #[arg(long)]
        config: PathBuf,
    },
    /// Check a configuration without starting: the file, its table, the TM
    /// id, the self-source ports, the replies steering home, the table
    /// file's mode. Exit 0 with a summary, or 1 with one line per problem.
    CheckConfig {
        /// Configuration file (TOML; TMD_* environment variables override keys).
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli: Cli = match cli_common::cli::parse("tmd") {
        Ok(c) => c,
        Err(code) => return code,
    };
    let result = match cli.command {
        Command::Run { config } => run(&config),
        Command::Generate(a) => cli_common::generate::generate::<Cli>(&a),
        Command::CheckConfig { config } => {
            cli_common::cli::report_check("tmd", &config, tm_node::check::check(&config))
        }
    };
    cli_common::cli::finish("tmd", result)
}

/// SIGHUP: the admin endpoint's token and TLS files are read again (a
/// renewed certificate); everything else in the file needs a restart
/// (SIGTERM drains), and a change there is said.
fn reload_admin(
    path: &Path,
    running: &NodeConfig,
    reloader: Option<&admin_http::server::Reloader>,
) {
    let cfg = match NodeConfig::load(path) {
        Ok(c) => c,
        Err(e) => {
            log::error!("SIGHUP: reload refused, the running configuration stays: {e:#}");
            return;
        }
    };
    match reloader.map(|r| r.reload(&cfg.admin)) {
        Some(Err(e)) => {
            log::error!(
                "SIGHUP: reload refused, the running configuration stays: admin endpoint: {e}"
            );
            return;
        }
        _ => log::info!("SIGHUP: admin endpoint's token and TLS files reloaded"),
    }
    let mut rest = cfg.clone();
    rest.admin = running.admin.clone();
    if rest != *running {
        log::warn!("SIGHUP: only the admin endpoint's token and TLS are reloaded: the other changes need a restart");
    }
}

fn run(path: &Path) -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cfg = NodeConfig::load(path)?;
    let tm_node::check::Ready { table, tm, snat } =
        tm_node::check::ready(&cfg).map_err(|problems| anyhow!(problems.join("; ")))?;
    let snat = Arc::new(snat);
    let server_sides = cfg.server_sides();
    for (addr, _, free) in snat.usage() {
        log::info!(
            "SNAT {addr}: {free} self-source ports for TM {} ('{}')",
            cfg.tm_id,
            table.tms()[usize::from(tm)].name
        );
    }
    // Source hash and persistence score servers with the cluster's key
    // (derived from the table's): every TM picks alike.
    let key = tm_node::persist::cluster_key(table.key());
    let domains: Vec<Arc<tm_node::persist::Domain>> = cfg
        .persistence_domains()
        .into_iter()
        .map(|d| {
            Arc::new(tm_node::persist::Domain::new(
                &d.name,
                d.members,
                d.persistence,
                d.by_host,
                key,
            ))
        })
        .collect();
    let pools: Vec<Arc<Pool>> = cfg
        .pools
        .iter()
        .map(|p| {
            Arc::new(Pool::new(
                &p.name,
                p.method,
                &p.servers
                    .iter()
                    .map(|s| (s.address, s.weight))
                    .collect::<Vec<_>>(),
                key,
            ))
        })
        .collect();
    // Buddy links, from the follower's side (validated: the leader exists
    // and has persistence).
    let follow = |name: &str| -> Result<Option<tm_node::proxy::Follow>> {
        let Some(l) = cfg.buddy_links.iter().find(|l| l.to == name) else {
            return Ok(None);
        };
        let leader_pool = cfg
            .virtual_servers
            .iter()
            .find(|v| v.name == l.from)
            .and_then(|v| pools.iter().find(|p| p.name == v.pool))
            .cloned()
            .ok_or_else(|| anyhow!("buddy_link {} → {}: no leader pool", l.from, l.to))?;
        let leader = domains
            .iter()
            .find(|d| d.members.contains(&l.from))
            .cloned()
            .ok_or_else(|| {
                anyhow!(
                    "buddy_link {} → {}: the leader has no persistence",
                    l.from,
                    l.to
                )
            })?;
        Ok(Some(tm_node::proxy::Follow {
            leader_name: l.from.clone(),
            leader_pool,
            leader,
            hosts: l.hosts.iter().map(|h| (h.from, h.to)).collect(),
        }))
    };
    let tables = Arc::new(tm_node::tables::Tables::new(cfg.tm_id, table));
    // Descriptors: the soft limit raised to the hard one; what connections
    // may hold of it (the rest kept for listeners, probes, admin).
    let limit = tm_node::fds::raise_limit().context("raising the file-descriptor limit")?;
    let fds = Arc::new(tm_node::fds::FdBudget::new(limit));
    log::info!(
        "file descriptors: limit {limit} (the soft limit raised to the hard one): {} for connections, about {} proxied TCP connections at once ({} kept for listeners, probes and the admin endpoint)",
        fds.max(),
        fds.max() / 2,
        tm_node::fds::reserved(limit)
    );
    // Virtual servers are shared by every worker thread (atomics and one lock per connection).
    let mut servers = Vec::new();
    for v in &cfg.virtual_servers {
        let pool = pools
            .iter()
            .find(|p| p.name == v.pool)
            .cloned()
            .ok_or_else(|| anyhow!("virtual_server {}: no pool {}", v.name, v.pool))?;
        servers.push(Arc::new(VirtualServer {
            name: v.name.clone(),
            pool,
            snat: Arc::clone(&snat),
            max_connections: v.max_connections,
            connect_timeout: Duration::from_millis(v.connect_timeout_ms),
            idle_timeout: Duration::from_millis(v.idle_timeout_ms),
            splice: v.splice,
            persistence: domains
                .iter()
                .find(|d| d.members.contains(&v.name))
                .cloned(),
            follows: follow(&v.name)?,
            dnat_only: v.dnat_only.then(|| Arc::clone(&tables)),
            tables: Arc::clone(&tables),
            fds: Arc::clone(&fds),
            stats: VsStats::default(),
        }));
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false); // stop accepting
    let (exit_tx, exit_rx) = tokio::sync::watch::channel(false); // end the worker runtimes
    let workers = cfg
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let tcp: Vec<(Arc<VirtualServer>, std::net::SocketAddr)> = cfg
        .virtual_servers
        .iter()
        .zip(&servers)
        .filter(|(v, _)| v.protocol == tm_node::config::Protocol::Tcp)
        .map(|(v, vs)| (Arc::clone(vs), v.listen))
        .collect();
    // One single-threaded runtime per worker, each with its own SO_REUSEPORT
    // listener per TCP virtual server: the kernel spreads connections, and a
    // connection's tasks never wake on another thread.
    // Connections go to the least-loaded worker when the kernel's hash
    // piles them on one (`proxy::Workers`).
    let spread = Arc::new(tm_node::proxy::Workers::new(workers));
    let (ready_tx, ready_rx) =
        std::sync::mpsc::channel::<Result<(usize, tokio::runtime::Handle), String>>();
    let mut worker_threads = Vec::new();
    for w in 0..workers {
        let (tcp, stop_rx, mut exit_rx, ready_tx, spread) = (
            tcp.clone(),
            stop_rx.clone(),
            exit_rx.clone(),
            ready_tx.clone(),
            Arc::clone(&spread),
        );
        worker_threads.push(
            std::thread::Builder::new()
                .name(format!("tmd-worker-{w}"))
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = ready_tx.send(Err(format!("worker {w}: runtime: {e}")));
                            return;
                        }
                    };
                    let handle = rt.handle().clone();
                    rt.block_on(async move {
                        for (vs, addr) in tcp {
                            match tm_node::proxy::reuseport_listener(addr) {
                                Ok(l) => {
                                    tokio::spawn(proxy::serve(
                                        vs,
                                        l,
                                        stop_rx.clone(),
                                        Arc::clone(&spread),
                                        w,
                                    ));
                                }
                                Err(e) => {
                                    let _ = ready_tx.send(Err(format!(
                                        "virtual_server {}: cannot listen on {addr}: {e}",
                                        vs.name
                                    )));
                                    return;
                                }
                            }
                        }
                        let _ = ready_tx.send(Ok((w, handle)));
                        let _ = exit_rx.changed().await;
                    });
                })?,
        );
    }
    drop(ready_tx);
    let mut startup: Result<()> = Ok(());
    let mut handles = Vec::new();
    for _ in 0..workers {
        match ready_rx.recv() {
            Ok(Ok(h)) => handles.push(h),
            Ok(Err(e)) => startup = Err(anyhow!(e)),
            Err(_) => startup = Err(anyhow!("a worker thread ended during startup")),
        }
    }
    handles.sort_by_key(|(w, _)| *w);
    if startup.is_ok() && !spread.set_handles(handles.into_iter().map(|(_, h)| h).collect()) {
        log::warn!("connections stay on the worker that accepts them (the worker runtimes are not all known)");
    }
    if let Err(e) = startup {
        let _ = exit_tx.send(true);
        for t in worker_threads {
            let _ = t.join();
        }
        return Err(e);
    }
    for (v, vs) in cfg.virtual_servers.iter().zip(&servers) {
        log::info!(
            "virtual server {} on {} ({:?}) → pool {}",
            vs.name,
            v.listen,
            v.protocol,
            v.pool
        );
    }
    log::info!("{workers} worker thread(s)");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let result = runtime.block_on(async move {
        let checks_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        for (p, pool) in cfg.pools.iter().zip(&pools) {
            if let Some(h) = &p.health {
                log::info!("pool {}: health checks every {} ms (rise {}, fall {})", p.name, h.interval_ms, h.rise, h.fall);
                tokio::spawn(tm_node::health::run(Arc::clone(pool), h.clone(), Arc::clone(&snat), Arc::clone(&checks_stop)));
            }
        }
        for (v, vs) in cfg.virtual_servers.iter().zip(&servers) {
            if v.protocol == tm_node::config::Protocol::Udp {
                let socket = tokio::net::UdpSocket::bind(v.listen).await.with_context(|| format!("virtual_server {}: cannot listen on {}", v.name, v.listen))?;
                tokio::spawn(tm_node::udp::serve(Arc::clone(vs), socket, stop_rx.clone()));
            }
        }
        let admin_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let server = admin_http::Server::bind(&cfg.admin, tm_node::admin::limits())?;
        let admin_reloader = server.reloader();
        let admin_state = Arc::new(tm_node::admin::AdminState {
            tm_id: cfg.tm_id,
            tables: Arc::clone(&tables),
            snat: Arc::clone(&snat),
            servers: servers.clone(),
            table_file: Some(cfg.table.clone()),
            server_sides,
            domains,
        });
        let admin_thread = {
            let stop = Arc::clone(&admin_stop);
            std::thread::Builder::new().name("tmd-admin".into()).spawn(move || {
                if let Err(e) = server.serve(tm_node::admin::handler(admin_state), &stop) {
                    log::error!("admin endpoint stopped: {e}");
                }
            })?
        };
        log::info!("admin endpoint on {}://{}", cfg.admin.scheme(), cfg.admin.listen);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("signal handler")?;
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("signal handler")?;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
                _ = hup.recv() => reload_admin(path, &cfg, admin_reloader.as_ref()),
            }
        }
        log::info!("stopping: no new connections; draining for at most {} ms", cfg.drain_timeout_ms);
        let _ = stop_tx.send(true);
        checks_stop.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_millis(cfg.drain_timeout_ms);
        loop {
            let open: u64 = servers.iter().map(|v| v.stats.active.load(Ordering::Acquire)).sum();
            if open == 0 {
                break;
            }
            if Instant::now() >= deadline {
                log::warn!("drain deadline reached with {open} connections open");
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        admin_stop.store(true, Ordering::Relaxed);
        let _ = admin_thread.join();
        for v in &servers {
            let s = &v.stats;
            log::info!(
                "{}: {} connections, refused {} (limit) {} (no server) {} (no port), {} failed to connect",
                v.name,
                s.total.load(Ordering::Relaxed),
                s.refused_limit.load(Ordering::Relaxed),
                s.refused_no_server.load(Ordering::Relaxed),
                s.refused_ports.load(Ordering::Relaxed),
                s.connect_failed.load(Ordering::Relaxed)
            );
        }
        Ok::<(), anyhow::Error>(())
    });
    let _ = exit_tx.send(true);
    for t in worker_threads {
        let _ = t.join();
    }
    result
}
