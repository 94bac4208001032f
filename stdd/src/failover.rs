//! TM liveness and automatic failover: each TM's health endpoint is probed every interval; after enough misses in a row the distributor switches on its own to the failover table for the set of failed TMs.
//!
//! The failover table is computed from the last table installed by an
//! operator (PUT /table, a transition, a reload) and the *set* of failed
//! TMs (`AllocationTable::failover` is order-independent), so front and
//! back distributors that detect the same failures install the same table
//! without talking. A TM that answers again is not taken back: only a new
//! table (`stdctl tm readmit`) readmits it — no flapping. Installing a new
//! table forgets every failure except of TMs that table gives no bucket.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use allocation::AllocationTable;
use serde::Deserialize;

use crate::admin::AdminState;

/// A TM's health endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TmHealth {
    /// TM id.
    pub id: u32,
    /// URL answering 200 while the TM serves (tmd: `http://ADMIN/healthz`).
    pub health: String,
    /// Bearer token for it, if any.
    #[serde(default)]
    pub token: Option<String>,
}

/// The `[failover]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverConfig {
    /// Time between probes of one TM, ms.
    pub interval_ms: u64,
    /// Misses in a row that declare a TM failed.
    pub misses: u32,
    /// Probe timeout, ms.
    pub timeout_ms: u64,
    /// After start, misses of a TM that has not answered yet count only
    /// once this long has passed (TMs starting with the distributor), ms.
    pub startup_grace_ms: u64,
    /// The TMs to probe (none: no automatic failover).
    #[serde(rename = "tm")]
    pub tms: Vec<TmHealth>,
    /// What the probes trust and present to `https://` health URLs
    /// (`[failover.tls]`: `ca`, and `cert`/`key` for TMs demanding one).
    pub tls: admin_http::tls::ClientTls,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            interval_ms: 300,
            misses: 3,
            timeout_ms: 250,
            startup_grace_ms: 10_000,
            tms: Vec::new(),
            tls: admin_http::tls::ClientTls::default(),
        }
    }
}

/// What the prober and the admin endpoint share.
#[derive(Debug, Default)]
pub struct FailoverState {
    /// The last table an operator installed (failovers are computed from it).
    base: Mutex<Option<AllocationTable>>,
    /// TMs declared failed since.
    failed: Mutex<BTreeSet<u32>>,
    /// Per probed TM id: 1 if its last probe answered.
    up: Mutex<Vec<(u32, bool)>>,
    /// Failovers performed.
    pub failovers: AtomicU64,
}

impl FailoverState {
    /// A new table was installed by an operator: it is the new base; only
    /// failures of TMs it gives no bucket are kept.
    pub fn installed(&self, table: &AllocationTable) {
        let lock = |m: &Mutex<BTreeSet<u32>>| {
            let mut f = m.lock().unwrap_or_else(|p| p.into_inner());
            // Whatever its group: a TM with buckets in it is in service.
            f.retain(|&id| {
                table
                    .tm_index_by_id(id)
                    .is_none_or(|i| table.buckets_of(i) == 0)
            });
        };
        lock(&self.failed);
        *self.base.lock().unwrap_or_else(|p| p.into_inner()) = Some(table.clone());
    }

    /// The base goes back to `table` (an abort while failed over): the
    /// failures stay.
    pub fn rebase(&self, table: &AllocationTable) {
        *self.base.lock().unwrap_or_else(|p| p.into_inner()) = Some(table.clone());
    }

    /// TMs declared failed.
    pub fn failed(&self) -> Vec<u32> {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect()
    }

    /// (TM id, up) of every probed TM.
    pub fn up(&self) -> Vec<(u32, bool)> {
        self.up.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn probe(agent: &ureq::Agent, tm: &TmHealth) -> bool {
    let mut req = agent.get(&tm.health);
    if let Some(t) = &tm.token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    matches!(req.call(), Ok(r) if r.status() == 200)
}

/// Probes until `stop` the TMs the running configuration's `[failover]`
/// lists (a reload takes effect at the next round); fails TMs over as they
/// are declared failed.
pub fn run(state: &AdminState, stop: &AtomicBool) {
    let fo = &state.failover;
    // Nothing probed yet: the first round takes the configuration's section.
    let mut cfg = FailoverConfig::default();
    let mut agent = agent_for(&cfg);
    let mut misses: Vec<u32> = Vec::new();
    let mut seen: Vec<bool> = Vec::new();
    let started = Instant::now();
    let mut grace = Duration::from_millis(cfg.startup_grace_ms);
    let mut interval = Duration::from_millis(cfg.interval_ms.max(10));
    let mut next = Instant::now();
    let mut reloads = state.reloads.load(Ordering::Relaxed);
    while !stop.load(Ordering::Relaxed) {
        // A reload may have renewed the TLS files at the same paths.
        let now_reloads = state.reloads.load(Ordering::Relaxed);
        if now_reloads != reloads {
            reloads = now_reloads;
            agent = agent_for(&cfg);
        }
        // What the configuration says now (a SIGHUP may have changed it):
        // a TM probed before and still listed keeps its count of misses
        // and its last answer; one added starts as up.
        let changed = state
            .config
            .lock()
            .ok()
            .filter(|c| c.failover != cfg)
            .map(|c| c.failover.clone());
        if let Some(wanted) = changed {
            let before = |id: u32| cfg.tms.iter().position(|t| t.id == id);
            (misses, seen) = wanted
                .tms
                .iter()
                .map(|t| before(t.id).map_or((0, false), |i| (misses[i], seen[i])))
                .unzip();
            {
                let mut up = fo.up.lock().unwrap_or_else(|p| p.into_inner());
                let now: Vec<(u32, bool)> = wanted
                    .tms
                    .iter()
                    .map(|t| {
                        let was = up.iter().find(|(id, _)| *id == t.id).map(|u| u.1);
                        (t.id, was.unwrap_or(true))
                    })
                    .collect();
                *up = now;
            }
            agent = agent_for(&wanted);
            interval = Duration::from_millis(wanted.interval_ms.max(10));
            grace = Duration::from_millis(wanted.startup_grace_ms);
            log::info!(
                "failover: probing {} TMs every {} ms; failover after {} misses",
                wanted.tms.len(),
                wanted.interval_ms,
                wanted.misses
            );
            cfg = wanted;
            next = Instant::now();
        }
        let now = Instant::now();
        if now < next {
            std::thread::sleep((next - now).min(Duration::from_millis(50)));
            continue;
        }
        next = now + interval;
        for (i, tm) in cfg.tms.iter().enumerate() {
            let alive = probe(&agent, tm);
            if let Some(u) = fo.up.lock().unwrap_or_else(|p| p.into_inner()).get_mut(i) {
                u.1 = alive;
            }
            if alive {
                misses[i] = 0;
                seen[i] = true;
                continue;
            }
            if !seen[i] && started.elapsed() < grace {
                continue; // not up yet: starting with us
            }
            misses[i] = misses[i].saturating_add(1);
            if misses[i] == cfg.misses {
                log::warn!(
                    "TM {}: {} probes in a row unanswered ({})",
                    tm.id,
                    cfg.misses,
                    tm.health
                );
            }
            // Every probe while it stays down: a table installed meanwhile
            // that gives it buckets (a push built before it failed) counts
            // it in service again; it is failed over again at once, never
            // steered to while dead.
            if misses[i] >= cfg.misses && !fo.failed().contains(&tm.id) {
                fail_over(state, tm.id);
            }
        }
    }
}

fn agent_for(cfg: &FailoverConfig) -> ureq::Agent {
    // The configuration's check loaded the same files: a failure here is
    // one changed since, and HTTPS probes then fail (by name, logged).
    let tls = cfg.tls.load("failover.tls").unwrap_or_else(|e| {
        log::error!("failover: {e}: https:// probes will fail");
        None
    });
    let builder = ureq::AgentBuilder::new().timeout(Duration::from_millis(cfg.timeout_ms.max(1)));
    admin_http::client::agent(builder, tls.as_ref())
}

/// Declares TM `id` failed and installs the failover table for every failed TM.
pub fn fail_over(state: &AdminState, id: u32) {
    let fo = &state.failover;
    let Ok(config) = state.config.lock() else {
        return;
    };
    let base = fo
        .base
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_else(|| state.plan.load().table().clone());
    let Some(k) = base.tm_index_by_id(id) else {
        return;
    };
    if base.buckets_of(k) == 0 {
        return; // out of service already (in its own group): nothing to move
    }
    let set: Vec<u32> = {
        let mut f = fo.failed.lock().unwrap_or_else(|p| p.into_inner());
        if !f.insert(id) {
            return;
        }
        f.iter().copied().collect()
    };
    let failover = |t: &AllocationTable| {
        let indexes: Vec<allocation::TmIndex> =
            set.iter().filter_map(|&i| t.tm_index_by_id(i)).collect();
        t.failover(&indexes).map(|c| c.table)
    };
    let table = match failover(&base) {
        Ok(t) => t,
        Err(e) => {
            log::error!("failover for TMs {set:?} impossible: {e}; the running table stays");
            return;
        }
    };
    let current = state.plan.load();
    // Switched: the transition carries on over the failover tables of both
    // operator tables (the same on every distributor: the failover depends
    // on (table, set) alone), open if it was, its pins and memory kept.
    let previous = match current.operator_previous() {
        None => None,
        Some(p) => match failover(p) {
            Ok(t) => Some((p.clone(), t)),
            Err(e) => {
                log::error!(
                    "failover for TMs {set:?} during the transition from version {}: {e}; the running table stays",
                    p.version()
                );
                return;
            }
        },
    };
    let plan = config
        .plan(table)
        .map_err(|e| e.to_string())
        .and_then(|plan| {
            let Some((_, prev)) = &previous else {
                return Ok(plan);
            };
            let plan = plan
                .with_previous(prev.clone())
                .map_err(|e| e.to_string())?;
            Ok(if current.is_open() {
                plan.opened()
            } else {
                plan
            })
        });
    match plan {
        Ok(plan) => {
            let failed: Vec<u32> = set.to_vec();
            let plan = config.carry_state(plan, &current, &failed).derived_from(
                base.clone(),
                previous.as_ref().map(|(p, _)| p.clone()),
                failed,
            );
            state.change_plan(|| state.plan.replace(plan));
            state.swaps.fetch_add(1, Ordering::Relaxed);
            fo.failovers.fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "failover: TMs {set:?} failed; their buckets now go to the others (table version {}){}",
                base.version(),
                match &previous {
                    Some((p, _)) => format!(
                        "; the transition from version {} carries on over both tables' failover",
                        p.version()
                    ),
                    None => String::new(),
                }
            );
        }
        Err(e) => log::error!("failover for TMs {set:?}: {e}; the running table stays"),
    }
}
