//! The transition coordinator (DESIGN §4): prepare every TM, switch and open every distributor, drain, commit — or roll back every node that may have changed — as a state machine that a driver runs over HTTP (stdctl) or in process (the simulator).
//!
//! The coordinator does no I/O and reads no clock. [`Push::step`] says what
//! to do next: call a node ([`Step::Call`]; the driver then hands the result
//! to [`Push::answer`]), wait until a time, print a progress line, or stop
//! with an [`Outcome`]. Its rules:
//!
//! * A node whose state is unknown (no answer, an error, an answer that is
//!   not the expected message, or a state other than the one this push
//!   put it in) is never counted as drained: when the drain window ends
//!   with such a node the push stops with the node named and the cluster
//!   left switched; committing anyway (`force`) or aborting is the
//!   operator's explicit choice.
//! * Before the commit, every distributor must run this very table
//!   (version and checksum); a distributor that restarted on the old table
//!   is switched again; one that cannot be read stops the push uncommitted.
//! * A failure before the commit rolls back every node that was sent a
//!   change — the one whose call failed included, since a timed-out call
//!   may have been carried out — with retries, and names each node that
//!   could not be rolled back.
//! * Every node call is idempotent for the same table, so a second run
//!   with the same table resumes a transition an earlier run left behind.

use std::time::Duration;

use allocation::{file, AllocationTable};

use crate::api::{
    AbortAnswer, CommitAnswer, DistributorPhase, DistributorTransition, HeldPort, PrepareRequest,
    StepRequest, TableId, TmPhase, TmPins, TmTransition,
};

/// A node of the cluster, by its place in [`PushSpec`]'s lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeId {
    /// The i-th distributor.
    Distributor(usize),
    /// The i-th TM.
    Tm(usize),
}

/// A request to a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// TM: take the next table (answer: [`Answer::Tm`]).
    Prepare(PrepareRequest),
    /// TM: the self-source ports it holds in buckets moving away ([`Answer::Held`]).
    HeldPorts,
    /// TM: its transition state ([`Answer::Tm`]).
    TmState,
    /// TM: the flows it serves that the tables in force do not steer to it ([`Answer::Pins`]).
    Pins,
    /// Distributor: steer by this table (file text), keeping the running one as previous ([`Answer::Distributor`]).
    Switch(String),
    /// Distributor: new flows in moved buckets start on their new owner,
    /// the TMs' pinned flows stay with them ([`Answer::Distributor`]).
    Open(StepRequest),
    /// Distributor: its transition state ([`Answer::Distributor`]).
    DistributorState,
    /// Either: drop the previous table, keep this one ([`Answer::Committed`]);
    /// a distributor takes the pins, a TM the ports others' pins hold.
    Commit(StepRequest),
    /// Either: go back from this table (any, when `None`) to the previous one ([`Answer::Aborted`]).
    Abort(Option<TableId>),
}

/// A node's answer, typed by the call it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A TM's transition state.
    Tm(TmTransition),
    /// A distributor's transition state.
    Distributor(DistributorTransition),
    /// Ports a TM holds in moving buckets.
    Held(Vec<HeldPort>),
    /// A TM's pinned flows.
    Pins(TmPins),
    /// A commit's result.
    Committed(CommitAnswer),
    /// An abort's result.
    Aborted(AbortAnswer),
}

/// Why a call has no usable answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// No answer (refused, reset, timed out): the node may or may not have acted.
    NoAnswer(String),
    /// An error status and its text.
    Status(u16, String),
    /// A success status whose body is not the expected message.
    Garbage(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::NoAnswer(e) => write!(f, "no answer ({e})"),
            CallError::Status(code, text) => write!(f, "{code} {}", text.trim()),
            CallError::Garbage(e) => write!(f, "unreadable answer ({e})"),
        }
    }
}

/// What a push needs to know of the cluster and its limits.
#[derive(Debug, Clone)]
pub struct PushSpec {
    /// Distributor names, in the order they are switched.
    pub distributors: Vec<String>,
    /// TMs: (id in the tables, name).
    pub tms: Vec<(u32, String)>,
    /// Longest wait for the old owners to drain before the commit.
    pub drain_window: Duration,
    /// Time between two rounds of drain questions, and between retries.
    pub poll: Duration,
    /// Tries of each rollback and commit call (at least 1).
    pub attempts: u32,
    /// Commit when the window ends even if some TM's state is unknown.
    pub force: bool,
}

/// What a finished push did.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// The table the cluster ran.
    pub from: TableId,
    /// The table it runs now.
    pub to: TableId,
    /// Buckets whose owner changed.
    pub moved_buckets: usize,
    /// TMs left out: out of service in both tables, not answering.
    pub skipped: Vec<String>,
    /// From the last open to the commit.
    pub drain: Duration,
    /// Connections TMs still reported in moved buckets at the commit.
    pub moving_at_commit: u64,
    /// Flows the TMs reported at the commit that stay pinned to them.
    pub pinned_at_commit: u64,
    /// TMs whose state was unknown at a forced commit.
    pub unknown_at_commit: Vec<String>,
    /// Things the operator should know (a node that could not persist the table, …).
    pub warnings: Vec<String>,
}

/// How a push ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Every node runs the new table alone.
    Committed(Summary),
    /// A node failed before the commit; every node that may have changed
    /// was told to go back, except those listed (node: why).
    RolledBack {
        /// What failed.
        cause: String,
        /// Nodes that could not be rolled back, each with the reason.
        not_rolled_back: Vec<String>,
    },
    /// Stopped with the cluster switched (nothing committed, or the commit
    /// unfinished): consistent, and the operator chooses what comes next.
    Stopped {
        /// Why, naming the nodes.
        cause: String,
    },
}

/// What the driver does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Send this call; hand the result to [`Push::answer`].
    Call(NodeId, Call),
    /// Wait until this time (on the driver's clock), then step again.
    WaitUntil(Duration),
    /// A progress line for the operator.
    Say(String),
    /// The push is over.
    Done(Outcome),
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    Prepare {
        pos: usize,
    },
    /// The moving ports of the prepared TMs not asked yet, before the
    /// joiner at `pos` (or, `pos` past the end, after the last one).
    Held {
        pos: usize,
    },
    /// A joiner prepared again with the whole held list: one prepared
    /// before another joiner whose open connections hold ports it gets.
    Rejoin {
        i: usize,
    },
    Switch {
        i: usize,
    },
    Open {
        i: usize,
    },
    /// Each prepared TM's pinned flows, before the open or the commit.
    Pins {
        i: usize,
        commit: bool,
        /// The i-th TM answered idle on the old table (restarted): prepare
        /// it again, then ask again.
        again: bool,
    },
    Drain {
        i: usize,
        total: u64,
        unknown: Vec<String>,
        /// The i-th TM came back idle on the old table (restarted): prepare it again.
        again: bool,
    },
    Verify {
        i: usize,
    },
    Reswitch {
        i: usize,
    },
    Commit {
        i: usize,
        attempt: u32,
    },
    Rollback {
        i: usize,
        attempt: u32,
    },
    /// TM `t` failed its prepare or its first pins: before rolling back,
    /// ask every distributor whether an earlier push left it open on (or
    /// switched to, or committed) this table — a resume, where going back
    /// would cut flows or abort the TMs alone — and whether it fails `t` over.
    Survey {
        i: usize,
        t: usize,
        cause: String,
        resumed: bool,
        everywhere: bool,
        /// Distributors whose state could not be read, and why.
        unknown: Vec<String>,
        /// Where the push goes on if `t` is left out.
        then: Box<Phase>,
    },
    Finished,
}

impl Phase {
    /// The survey of the distributors for TM `t`, which failed (`cause`);
    /// the push goes on with `then` if `t` is left out.
    fn survey(t: usize, cause: String, then: Phase) -> Phase {
        Phase::Survey {
            i: 0,
            t,
            cause,
            resumed: false,
            everywhere: true,
            unknown: Vec::new(),
            then: Box::new(then),
        }
    }
}

/// One push of a table to a cluster: see the module doc.
#[derive(Debug)]
pub struct Push {
    spec: PushSpec,
    from: TableId,
    to: TableId,
    body: String,
    /// TM indexes in prepare order: members, then joiners.
    order: Vec<usize>,
    joining: Vec<bool>,
    /// In service in neither table: may be skipped when it fails.
    idle_both: Vec<bool>,
    moved: usize,
    phase: Phase,
    lines: std::collections::VecDeque<String>,
    waiting_until: Option<Duration>,
    pending: Option<NodeId>,
    /// Nodes sent a change (prepare, switch, open), in that order.
    changed: Vec<NodeId>,
    /// TMs that took the prepare.
    prepared: Vec<usize>,
    held: Vec<HeldPort>,
    /// The prepared TMs' pinned flows, from the last round of questions.
    pins: Vec<TmPins>,
    skipped: Vec<String>,
    opened_at: Option<Duration>,
    last_total: Option<u64>,
    last_unknown: Vec<String>,
    moving_at_commit: u64,
    unknown_at_commit: Vec<String>,
    warnings: Vec<String>,
    /// Rollback: its cause, and the nodes not rolled back.
    cause: String,
    not_rolled_back: Vec<String>,
    /// Commit order: distributors, then prepared TMs, then TMs whose
    /// skipped prepare may have been carried out (best effort).
    commit_list: Vec<(NodeId, bool)>,
    rollback_list: Vec<NodeId>,
    /// TMs whose moving ports are in `held`.
    asked: Vec<usize>,
    /// Each prepared joiner and how many held ports it was given.
    joined: Vec<(usize, usize)>,
    /// Reswitch: the switch is done, the open is next.
    reopen_only: bool,
    /// Why the push stopped with the cluster switched.
    stopped: Option<String>,
    /// TMs (indexes) whose drain state was unknown in the last round.
    unknown_tms: Vec<usize>,
    /// The window closed with them unknown: decided after the verify, by
    /// whether every distributor has failed them over.
    census: Option<(u64, Vec<String>, Vec<usize>)>,
    /// TM ids every distributor verified so far fails over (`None`: none
    /// verified yet).
    failed_everywhere: Option<Vec<u32>>,
    /// TMs left out of the commit: failed over by every distributor.
    left_out: Vec<usize>,
}

/// Whether a failed call is worth trying again: no answer, or a server error.
fn retryable(r: &Result<Answer, CallError>) -> bool {
    match r {
        Err(CallError::NoAnswer(_)) => true,
        Err(CallError::Status(code, _)) => *code >= 500,
        _ => false,
    }
}

fn describe(r: &Result<Answer, CallError>) -> String {
    match r {
        Ok(a) => format!("unexpected answer {a:?}"),
        Err(e) => e.to_string(),
    }
}

/// True when TM `id` has a bucket in its group of `t`.
fn in_service(t: &AllocationTable, id: u32) -> bool {
    t.tm_index_by_id(id).is_some_and(|i| t.buckets_of(i) > 0)
}

impl Push {
    /// A push from `from` (the table the cluster runs, or the previous
    /// table of a transition being resumed) to `to`. Refused, with the
    /// reason, before anything changes: `to` not newer, a TM drained and
    /// another admitted at once.
    pub fn new(
        spec: PushSpec,
        from: &AllocationTable,
        to: &AllocationTable,
    ) -> Result<Push, String> {
        if to.version() <= from.version() {
            return Err(format!(
                "table version {} is not newer than the running version {}",
                to.version(),
                from.version()
            ));
        }
        if spec.distributors.is_empty() || spec.tms.is_empty() {
            return Err("a cluster needs at least one distributor and one TM".into());
        }
        let joining: Vec<bool> = spec
            .tms
            .iter()
            .map(|&(id, _)| !in_service(from, id) && in_service(to, id))
            .collect();
        let draining = spec
            .tms
            .iter()
            .any(|&(id, _)| in_service(from, id) && !in_service(to, id));
        if draining && joining.iter().any(|&j| j) {
            return Err("this table drains a TM to zero and admits a joining TM at once: push one change, then the other".into());
        }
        let idle_both = spec
            .tms
            .iter()
            .map(|&(id, _)| !in_service(from, id) && !in_service(to, id))
            .collect();
        let mut order: Vec<usize> = (0..spec.tms.len()).filter(|&i| !joining[i]).collect();
        order.extend((0..spec.tms.len()).filter(|&i| joining[i]));
        let mut lines = std::collections::VecDeque::new();
        if to.key() != from.key() {
            lines.push_back(
                "warning: the new table has another hash key: every bucket moves".into(),
            );
        }
        Ok(Push {
            from: TableId::of(from),
            to: TableId::of(to),
            body: file::render(to),
            moved: from.moved_buckets(to),
            order,
            joining,
            idle_both,
            phase: Phase::Prepare { pos: 0 },
            lines,
            waiting_until: None,
            pending: None,
            changed: Vec::new(),
            prepared: Vec::new(),
            held: Vec::new(),
            pins: Vec::new(),
            skipped: Vec::new(),
            opened_at: None,
            last_total: None,
            last_unknown: Vec::new(),
            moving_at_commit: 0,
            unknown_at_commit: Vec::new(),
            warnings: Vec::new(),
            cause: String::new(),
            not_rolled_back: Vec::new(),
            commit_list: Vec::new(),
            rollback_list: Vec::new(),
            asked: Vec::new(),
            joined: Vec::new(),
            reopen_only: false,
            stopped: None,
            unknown_tms: Vec::new(),
            census: None,
            failed_everywhere: None,
            left_out: Vec::new(),
            spec,
        })
    }

    /// The table being installed.
    pub fn target(&self) -> &TableId {
        &self.to
    }

    /// A node's name.
    pub fn name(&self, node: NodeId) -> &str {
        match node {
            NodeId::Distributor(i) => &self.spec.distributors[i],
            NodeId::Tm(i) => &self.spec.tms[i].1,
        }
    }

    fn say(&mut self, line: String) {
        self.lines.push_back(line);
    }

    fn call(&mut self, node: NodeId, call: Call) -> Step {
        self.pending = Some(node);
        Step::Call(node, call)
    }

    /// What to do next, at driver time `now`.
    pub fn step(&mut self, now: Duration) -> Step {
        if let Some(line) = self.lines.pop_front() {
            return Step::Say(line);
        }
        if let Some(until) = self.waiting_until {
            if now < until {
                return Step::WaitUntil(until);
            }
            self.waiting_until = None;
        }
        debug_assert!(
            self.pending.is_none(),
            "Push::step called before the answer to the last call"
        );
        if self.pending.is_some() {
            // A driver defect: never guess an answer.
            self.phase = Phase::Finished;
            self.stopped = Some(
                "the driver stepped the coordinator before answering its call: stopped, nothing assumed"
                    .into(),
            );
        }
        match self.phase.clone() {
            Phase::Prepare { pos } => {
                let Some(&t) = self.order.get(pos) else {
                    // Two joiners or more: the last ones' open connections
                    // (a drained TM readmitted while its pinned flows
                    // live) hold ports the earlier ones were given.
                    if self.joined.len() > 1 && self.unasked().is_some() {
                        self.phase = Phase::Held { pos };
                    } else if let Some(i) = self.rejoin_from(0) {
                        self.phase = Phase::Rejoin { i };
                    } else {
                        self.phase = Phase::Switch { i: 0 };
                    }
                    return self.step(now);
                };
                if self.joining[t] && self.unasked().is_some() {
                    self.phase = Phase::Held { pos };
                    return self.step(now);
                }
                let held = self.joining[t].then(|| self.held.clone());
                self.changed.push(NodeId::Tm(t));
                let req = PrepareRequest {
                    table: self.body.clone(),
                    held,
                };
                self.call(NodeId::Tm(t), Call::Prepare(req))
            }
            Phase::Held { pos } => match self.unasked() {
                Some(m) => self.call(NodeId::Tm(m), Call::HeldPorts),
                None => {
                    self.phase = Phase::Prepare { pos };
                    self.step(now)
                }
            },
            Phase::Rejoin { i } => {
                let (t, _) = self.joined[i];
                let req = PrepareRequest {
                    table: self.body.clone(),
                    held: Some(self.held.clone()),
                };
                self.call(NodeId::Tm(t), Call::Prepare(req))
            }
            Phase::Switch { i } => {
                if i == self.spec.distributors.len() {
                    self.phase = Phase::Pins {
                        i: 0,
                        commit: false,
                        again: false,
                    };
                    return self.step(now);
                }
                self.changed.push(NodeId::Distributor(i));
                self.call(NodeId::Distributor(i), Call::Switch(self.body.clone()))
            }
            Phase::Open { i } => {
                if i == self.spec.distributors.len() {
                    self.opened_at = Some(now);
                    self.phase = Phase::Drain {
                        i: 0,
                        total: 0,
                        unknown: Vec::new(),
                        again: false,
                    };
                    return self.step(now);
                }
                let open = self.open_request();
                self.call(NodeId::Distributor(i), Call::Open(open))
            }
            Phase::Pins { i, commit, again } => match self.prepared.get(i) {
                Some(&t) if again => {
                    let req = PrepareRequest {
                        table: self.body.clone(),
                        held: self.joining[t].then(|| self.held.clone()),
                    };
                    self.call(NodeId::Tm(t), Call::Prepare(req))
                }
                Some(&t) => {
                    if i == 0 {
                        self.pins.clear();
                    }
                    self.call(NodeId::Tm(t), Call::Pins)
                }
                None if commit => {
                    self.start_commit();
                    self.step(now)
                }
                None => {
                    self.phase = Phase::Open { i: 0 };
                    self.step(now)
                }
            },
            Phase::Drain {
                i,
                total,
                unknown,
                again,
            } => {
                if let Some(&t) = self.prepared.get(i) {
                    if again {
                        let req = PrepareRequest {
                            table: self.body.clone(),
                            held: self.joining[t].then(|| self.held.clone()),
                        };
                        return self.call(NodeId::Tm(t), Call::Prepare(req));
                    }
                    return self.call(NodeId::Tm(t), Call::TmState);
                }
                self.end_of_round(now, total, unknown)
            }
            Phase::Verify { i } => {
                if i == self.spec.distributors.len() {
                    if let Some(stop) = self.settle_census() {
                        return stop;
                    }
                    self.phase = Phase::Pins {
                        i: 0,
                        commit: true,
                        again: false,
                    };
                    return self.step(now);
                }
                self.call(NodeId::Distributor(i), Call::DistributorState)
            }
            Phase::Survey {
                i,
                t,
                cause,
                resumed,
                everywhere,
                unknown,
                then,
            } => {
                if i < self.spec.distributors.len() {
                    return self.call(NodeId::Distributor(i), Call::DistributorState);
                }
                let name = self.spec.tms[t].1.clone();
                let cause = match unknown.is_empty() {
                    true => cause,
                    false => format!("{cause} (and {})", unknown.join("; ")),
                };
                if !resumed {
                    // Nothing switched to this table: going back is safe.
                    self.start_rollback(cause);
                } else if everywhere {
                    // Dead, and its buckets moved on every distributor.
                    let line = format!(
                        "{name}: failed over by every distributor ({cause}): left out of the transition; `stdctl tm readmit` brings it back"
                    );
                    self.say(format!("warning: {line}"));
                    self.warnings.push(line);
                    self.prepared.retain(|&p| p != t);
                    if !self.left_out.contains(&t) {
                        self.left_out.push(t);
                    }
                    self.phase = *then;
                } else {
                    self.phase = Phase::Finished;
                    self.stopped = Some(format!(
                        "{cause}: nothing rolled back: the distributors are switched to {} from an earlier push, and going back now would abort the TMs alone; push again once {name} answers or every distributor has failed it over, or abort",
                        self.to
                    ));
                }
                self.step(now)
            }
            Phase::Reswitch { i } => {
                let call = if self.reopen_only {
                    Call::Open(self.open_request())
                } else {
                    Call::Switch(self.body.clone())
                };
                self.call(NodeId::Distributor(i), call)
            }
            Phase::Commit { i, .. } => match self.commit_list.get(i) {
                Some(&(node, _)) => {
                    let req = self.commit_request(node);
                    self.call(node, Call::Commit(req))
                }
                None => {
                    self.phase = Phase::Finished;
                    Step::Done(Outcome::Committed(Summary {
                        from: self.from.clone(),
                        to: self.to.clone(),
                        moved_buckets: self.moved,
                        skipped: self.skipped.clone(),
                        drain: self
                            .opened_at
                            .map_or(Duration::ZERO, |t| now.saturating_sub(t)),
                        moving_at_commit: self.moving_at_commit,
                        pinned_at_commit: self.pins.iter().map(|p| p.flows.len() as u64).sum(),
                        unknown_at_commit: self.unknown_at_commit.clone(),
                        warnings: self.warnings.clone(),
                    }))
                }
            },
            Phase::Rollback { i, .. } => match self.rollback_list.get(i) {
                Some(&node) => self.call(node, Call::Abort(Some(self.to.clone()))),
                None => {
                    self.phase = Phase::Finished;
                    Step::Done(Outcome::RolledBack {
                        cause: self.cause.clone(),
                        not_rolled_back: self.not_rolled_back.clone(),
                    })
                }
            },
            Phase::Finished => Step::Done(Outcome::Stopped {
                cause: self
                    .stopped
                    .clone()
                    .unwrap_or_else(|| "the push is over".into()),
            }),
        }
    }

    /// A prepared TM whose moving ports are not in `held` yet: asked
    /// before each joiner (the members before the first, each joiner
    /// before the next) so no joiner takes a port another TM's open
    /// connection holds.
    fn unasked(&self) -> Option<usize> {
        self.prepared
            .iter()
            .copied()
            .find(|t| !self.asked.contains(t))
    }

    /// The first prepared joiner from `i` on given fewer held ports than
    /// there are now.
    fn rejoin_from(&self, i: usize) -> Option<usize> {
        (i..self.joined.len()).find(|&k| self.joined[k].1 < self.held.len())
    }

    fn end_of_round(&mut self, now: Duration, total: u64, unknown: Vec<String>) -> Step {
        let opened = self.opened_at.unwrap_or(now);
        let over = now.saturating_sub(opened) >= self.spec.drain_window;
        if self.last_total != Some(total) || self.last_unknown != unknown {
            let mut line = format!("drain    {total} connections left in moved buckets");
            if !unknown.is_empty() {
                line += &format!(
                    "; state unknown, not counted as drained: {}",
                    unknown.join("; ")
                );
            }
            self.say(line);
            self.last_total = Some(total);
            self.last_unknown.clone_from(&unknown);
        }
        if total == 0 && unknown.is_empty() || over {
            self.failed_everywhere = None;
            if over && !unknown.is_empty() {
                // Decided after the verify: a TM every distributor has
                // failed over is out of the cluster, not undrained.
                let tms = std::mem::take(&mut self.unknown_tms);
                self.census = Some((total, unknown, tms));
                self.phase = Phase::Verify { i: 0 };
                return self.step(now);
            }
            if over && total > 0 {
                self.say(format!(
                    "drain    window of {} s over with {total} connections still in moved buckets: committing",
                    self.spec.drain_window.as_secs(),
                ));
            }
            self.moving_at_commit = total;
            self.unknown_at_commit = unknown;
            self.phase = Phase::Verify { i: 0 };
            return self.step(now);
        }
        self.unknown_tms.clear();
        self.phase = Phase::Drain {
            i: 0,
            total: 0,
            unknown: Vec::new(),
            again: false,
        };
        self.waiting_until = Some(now + self.spec.poll);
        Step::WaitUntil(now + self.spec.poll)
    }

    /// After the verify of a window that closed with TMs of unknown state:
    /// those every distributor fails over are left out of the commit (their
    /// connections went down with them; the distributors steer around
    /// them); any other stops the push — or, with `--force`, is committed
    /// regardless. The stop, if it stops.
    fn settle_census(&mut self) -> Option<Step> {
        let (total, unknown, tms) = self.census.take()?;
        let everywhere = self.failed_everywhere.take().unwrap_or_default();
        let mut left = Vec::new();
        for (u, &t) in unknown.iter().zip(&tms) {
            let (id, name) = (self.spec.tms[t].0, self.spec.tms[t].1.clone());
            if everywhere.contains(&id) {
                if !self.left_out.contains(&t) {
                    self.left_out.push(t);
                    self.prepared.retain(|&p| p != t);
                    self.say(format!(
                        "drain    {name:<12} failed over by every distributor: left out of the commit"
                    ));
                    self.warnings.push(format!(
                        "{name}: failed over by every distributor during the transition: left out of the commit (its connections went down with it); `stdctl tm readmit` brings it back"
                    ));
                }
            } else {
                left.push(u.clone());
            }
        }
        if !left.is_empty() && !self.spec.force {
            self.phase = Phase::Finished;
            let names: Vec<&str> = left
                .iter()
                .map(|u| u.split(':').next().unwrap_or(u))
                .collect();
            let cause = format!(
                "drain window of {} s over and the state of {} is unknown: nothing committed, every distributor stays switched to {}; push again to resume, with --force to commit regardless, or abort",
                self.spec.drain_window.as_secs(),
                names.join(", "),
                self.to
            );
            self.stopped = Some(cause.clone());
            return Some(Step::Done(Outcome::Stopped { cause }));
        }
        if total > 0 || !left.is_empty() {
            self.say(format!(
                "drain    window of {} s over with {total} connections still in moved buckets{}: committing",
                self.spec.drain_window.as_secs(),
                if left.is_empty() {
                    String::new()
                } else {
                    format!(" and {} node(s) of unknown state (--force)", left.len())
                }
            ));
        }
        self.moving_at_commit = total;
        self.unknown_at_commit = left;
        None
    }

    /// A verified distributor's failed TMs narrow those failed everywhere.
    fn census(&mut self, d: &DistributorTransition) {
        let mine = d.failed_tms();
        self.failed_everywhere = Some(match self.failed_everywhere.take() {
            None => mine.to_vec(),
            Some(so_far) => so_far.into_iter().filter(|id| mine.contains(id)).collect(),
        });
    }

    fn start_commit(&mut self) {
        let mut list: Vec<(NodeId, bool)> = (0..self.spec.distributors.len())
            .map(|i| (NodeId::Distributor(i), true))
            .collect();
        list.extend(self.prepared.iter().map(|&t| (NodeId::Tm(t), true)));
        // TMs skipped after a prepare without answer may have prepared.
        for n in &self.changed {
            if let NodeId::Tm(t) = *n {
                if !self.prepared.contains(&t) && !self.left_out.contains(&t) {
                    list.push((NodeId::Tm(t), false));
                }
            }
        }
        self.commit_list = list;
        self.phase = Phase::Commit { i: 0, attempt: 1 };
    }

    fn start_rollback(&mut self, cause: String) {
        self.cause = cause;
        // Distributors first (they steer by the new table), then TMs.
        let mut list: Vec<NodeId> = Vec::new();
        for n in self.changed.iter().rev() {
            if matches!(n, NodeId::Distributor(_)) && !list.contains(n) {
                list.push(*n);
            }
        }
        for n in &self.changed {
            if matches!(n, NodeId::Tm(_)) && !list.contains(n) {
                list.push(*n);
            }
        }
        self.rollback_list = list;
        self.phase = Phase::Rollback { i: 0, attempt: 1 };
    }

    /// The result of the call the last [`Step::Call`] asked for, at driver time `now`.
    pub fn answer(&mut self, result: Result<Answer, CallError>, now: Duration) {
        let Some(node) = self.pending.take() else {
            return;
        };
        let name = self.name(node).to_string();
        match self.phase.clone() {
            Phase::Prepare { pos } => {
                let t = self.order[pos];
                match self.prepared_answer(result) {
                    Ok(moving) => {
                        let detail = if self.joining[t] {
                            format!("joining; {} ports held by the others", self.held.len())
                        } else {
                            format!("{moving} connections in moved buckets")
                        };
                        self.say(format!("prepare  {name:<12} ok ({detail})"));
                        self.prepared.push(t);
                        if self.joining[t] {
                            self.joined.push((t, self.held.len()));
                        }
                        self.phase = Phase::Prepare { pos: pos + 1 };
                    }
                    Err(e) if self.idle_both[t] => {
                        self.say(format!(
                            "prepare  {name:<12} skipped: out of service in both tables ({e})"
                        ));
                        if !matches!(e, CallError::NoAnswer(_)) {
                            // It refused: it did not change.
                            self.changed.retain(|&n| n != node);
                        }
                        self.skipped.push(name);
                        self.phase = Phase::Prepare { pos: pos + 1 };
                    }
                    Err(e) => {
                        self.forget_if_refused(node, &e);
                        self.phase = Phase::survey(
                            t,
                            format!("{name}: prepare: {e}"),
                            Phase::Prepare { pos: pos + 1 },
                        );
                    }
                }
            }
            Phase::Rejoin { i } => match self.prepared_answer(result) {
                Ok(_) => {
                    self.say(format!(
                        "prepare  {name:<12} ok (joining again; {} ports held by the others)",
                        self.held.len()
                    ));
                    self.joined[i].1 = self.held.len();
                    self.phase = match self.rejoin_from(i + 1) {
                        Some(k) => Phase::Rejoin { i: k },
                        None => Phase::Switch { i: 0 },
                    };
                }
                Err(e) => self.start_rollback(format!("{name}: prepare: {e}")),
            },
            Phase::Held { pos } => match result {
                Ok(Answer::Held(list)) => {
                    if let Some(m) = self.unasked() {
                        self.asked.push(m);
                    }
                    self.held.extend(list);
                    self.held.sort_unstable();
                    self.held.dedup();
                    self.phase = Phase::Held { pos };
                }
                Ok(other) => self.start_rollback(format!(
                    "{name}: GET /transition/ports: not a list of ports ({other:?})"
                )),
                Err(e) => self.start_rollback(format!("{name}: GET /transition/ports: {e}")),
            },
            Phase::Switch { i } | Phase::Open { i } => {
                let opening = matches!(self.phase, Phase::Open { .. });
                let what = if opening { "open" } else { "switch" };
                match self.switched_answer(result, opening) {
                    Ok(()) => {
                        self.say(format!("{what:<8} {name:<12} ok"));
                        self.phase = if opening {
                            Phase::Open { i: i + 1 }
                        } else {
                            Phase::Switch { i: i + 1 }
                        };
                    }
                    Err(e) => {
                        if !opening {
                            self.forget_if_refused(node, &e);
                        }
                        self.start_rollback(format!("{name}: {what}: {e}"))
                    }
                }
            }
            Phase::Pins { i, commit, again } => {
                let t = self.prepared[i];
                let id = self.spec.tms[t].0;
                let next = |i| Phase::Pins {
                    i,
                    commit,
                    again: false,
                };
                let why = if again {
                    // Its answer to the prepare again; then its pins again.
                    match self.prepared_answer(result) {
                        Ok(_) => {
                            self.say(format!(
                                "pins     {name:<12} prepared again (it had restarted on {})",
                                self.from
                            ));
                            self.phase = next(i);
                            return;
                        }
                        Err(e) => Some(format!("restarted, and prepare again: {e}")),
                    }
                } else {
                    match result {
                        Ok(Answer::Pins(p)) if p.tm == id && p.table == self.to => {
                            self.say(format!(
                                "pins     {name:<12} {} flows kept on it, {} ports",
                                p.flows.len(),
                                p.ports.len()
                            ));
                            self.pins.push(p);
                            None
                        }
                        Ok(Answer::Pins(p)) if p.tm == id && p.table == self.from => {
                            // Restarted on the old table: its NAT must
                            // follow this push's table before anything opens
                            // or commits, whatever --force says.
                            self.phase = Phase::Pins {
                                i,
                                commit,
                                again: true,
                            };
                            return;
                        }
                        Ok(Answer::Pins(p)) => Some(format!(
                            "it answered for TM {} on {}, not TM {id} on this push's {}",
                            p.tm, p.table, self.to
                        )),
                        other => Some(describe(&other)),
                    }
                };
                match why {
                    None => self.phase = next(i + 1),
                    Some(why) if !commit => {
                        // (t leaves `prepared`: the next one takes its place)
                        self.phase =
                            Phase::survey(t, format!("{name}: its pinned flows: {why}"), next(i));
                    }
                    Some(why) if self.spec.force && !again => {
                        self.warnings.push(format!(
                            "{name}: its pinned flows before the commit: {why}: committed regardless (--force): its UDP sessions and connections in moved buckets may be cut"
                        ));
                        self.phase = next(i + 1);
                    }
                    Some(why) => {
                        self.phase = Phase::Finished;
                        self.stopped = Some(format!(
                            "{name}: its pinned flows before the commit: {why}: nothing committed, the cluster stays switched to {}; push again to resume, with --force to commit regardless, or abort",
                            self.to
                        ));
                    }
                }
            }
            Phase::Drain {
                i,
                mut total,
                mut unknown,
                again,
            } => {
                let mut ask_again = false;
                if again {
                    match self.prepared_answer(result) {
                        Ok(n) => {
                            self.say(format!(
                                "drain    {name:<12} prepared again (it had restarted on {})",
                                self.from
                            ));
                            total += n;
                        }
                        Err(e) => {
                            unknown.push(format!("{name}: restarted, and prepare again: {e}"));
                            self.unknown_tms.push(self.prepared[i]);
                        }
                    }
                } else {
                    match self.drain_answer(result) {
                        Ok(n) => total += n,
                        Err(DrainState::Restarted) => ask_again = true,
                        Err(DrainState::Unknown(why)) => {
                            unknown.push(format!("{name}: {why}"));
                            self.unknown_tms.push(self.prepared[i]);
                        }
                    }
                }
                self.phase = Phase::Drain {
                    i: if ask_again { i } else { i + 1 },
                    total,
                    unknown,
                    again: ask_again,
                };
            }
            Phase::Verify { i } => match result {
                Ok(Answer::Distributor(d)) if d.check().is_ok() && d.runs(&self.to) => {
                    self.census(&d);
                    if d.state == DistributorPhase::Switched && d.recovering.is_some() {
                        // Restarted and switched again: it drops what it
                        // cannot place until the commit hands it pins read
                        // after now (an open with this push's older pins
                        // would place too few).
                        self.say(format!(
                            "verify   {name:<12} switched, recovering from a restart: the commit's pins place its flows"
                        ));
                        self.phase = Phase::Verify { i: i + 1 };
                    } else if d.state == DistributorPhase::Switched {
                        // Switched but not open: open it.
                        self.phase = Phase::Reswitch { i };
                        self.reopen_only = true;
                    } else {
                        self.phase = Phase::Verify { i: i + 1 };
                    }
                }
                Ok(Answer::Distributor(d))
                    if d.check().is_ok()
                        && d.state == DistributorPhase::Idle
                        && d.runs(&self.from) =>
                {
                    self.census(&d);
                    self.say(format!(
                        "verify   {name:<12} runs {} alone (restarted?): switching it again",
                        self.from
                    ));
                    self.phase = Phase::Reswitch { i };
                }
                other => {
                    let why = match other {
                        Ok(Answer::Distributor(d)) => match d.check() {
                            Err(e) => format!("unreadable state ({e})"),
                            Ok(()) => format!(
                                "it runs {} ({:?}), not this push's {}",
                                d.table(),
                                d.state,
                                self.to
                            ),
                        },
                        Ok(a) => format!("unexpected answer {a:?}"),
                        Err(e) => e.to_string(),
                    };
                    self.phase = Phase::Finished;
                    self.stopped = Some(format!(
                        "{name}: before the commit: {why}: nothing committed, the cluster stays switched to {}; push again to resume, or abort",
                        self.to
                    ));
                }
            },
            Phase::Reswitch { i } => {
                let opening = self.reopen_only;
                let recovering =
                    matches!(&result, Ok(Answer::Distributor(d)) if d.recovering.is_some());
                match self.switched_answer(result, opening) {
                    Ok(()) if !opening && recovering => {
                        // As in the verify: the commit's pins end its recovery.
                        self.say(format!(
                            "switch   {name:<12} ok (again; recovering until the commit's pins)"
                        ));
                        self.phase = Phase::Verify { i: i + 1 };
                    }
                    Ok(()) if opening => {
                        self.reopen_only = false;
                        self.say(format!("open     {name:<12} ok (again)"));
                        self.phase = Phase::Verify { i: i + 1 };
                    }
                    Ok(()) => {
                        self.say(format!("switch   {name:<12} ok (again)"));
                        self.reopen_only = true;
                        self.phase = Phase::Reswitch { i };
                    }
                    Err(e) => {
                        self.phase = Phase::Finished;
                        self.stopped = Some(format!(
                            "{name}: switching again before the commit: {e}: nothing committed, the cluster stays switched to {}; push again to resume, or abort",
                            self.to
                        ));
                    }
                }
            }
            Phase::Commit { i, attempt } => {
                let (_, must) = self.commit_list[i];
                match result {
                    Ok(Answer::Committed(c)) if c.table == self.to => {
                        if let Some(n) = c.pins_refused.filter(|&n| n > 0) {
                            self.warnings.push(format!(
                                "{name}: {n} pinned flows refused (no room, or toward a TM no table has): they follow the table, and may be cut"
                            ));
                        }
                        if let Some(e) = c.persist_error {
                            self.warnings.push(format!(
                                "{name}: the committed table was not saved where it starts from ({e}): a restart would run an older table"
                            ));
                        }
                        self.say(format!("commit   {name:<12} ok"));
                        self.phase = Phase::Commit {
                            i: i + 1,
                            attempt: 1,
                        };
                    }
                    other => {
                        let why = match &other {
                            Ok(Answer::Committed(c)) => format!("it committed {}", c.table),
                            r => describe(r),
                        };
                        let retry = retryable(&other) && attempt < self.spec.attempts;
                        if retry {
                            self.phase = Phase::Commit {
                                i,
                                attempt: attempt + 1,
                            };
                            self.waiting_until = Some(now + self.spec.poll);
                        } else if !must {
                            self.warnings.push(format!(
                                "{name}: commit (its prepare was not answered): {why}"
                            ));
                            self.phase = Phase::Commit {
                                i: i + 1,
                                attempt: 1,
                            };
                        } else {
                            let done: Vec<String> = self.commit_list[..i]
                                .iter()
                                .map(|&(n, _)| self.name(n).to_string())
                                .collect();
                            self.phase = Phase::Finished;
                            self.stopped = Some(format!(
                                "{name}: commit: {why}: the commit is unfinished ({}); the nodes not committed stay switched or prepared, which steers correctly; push the same table again to finish",
                                if done.is_empty() {
                                    "no node committed".to_string()
                                } else {
                                    format!("committed: {}", done.join(", "))
                                }
                            ));
                        }
                    }
                }
            }
            Phase::Rollback { i, attempt } => {
                let settled = match &result {
                    Ok(Answer::Aborted(_)) => Ok(()),
                    r => Err((retryable(r), describe(r))),
                };
                match settled {
                    Ok(()) => {
                        self.say(format!("rollback {name:<12} ok"));
                        self.phase = Phase::Rollback {
                            i: i + 1,
                            attempt: 1,
                        };
                    }
                    Err((true, _)) if attempt < self.spec.attempts => {
                        self.phase = Phase::Rollback {
                            i,
                            attempt: attempt + 1,
                        };
                        self.waiting_until = Some(now + self.spec.poll);
                    }
                    Err((_, why)) => {
                        self.say(format!("rollback {name:<12} FAILED: {why}"));
                        self.not_rolled_back.push(format!("{name}: {why}"));
                        self.phase = Phase::Rollback {
                            i: i + 1,
                            attempt: 1,
                        };
                    }
                }
            }
            Phase::Survey {
                i,
                t,
                cause,
                mut resumed,
                mut everywhere,
                mut unknown,
                then,
            } => {
                let id = self.spec.tms[t].0;
                match result {
                    Ok(Answer::Distributor(d)) if d.check().is_ok() => {
                        // Open on this table (going back would move the
                        // flows its window started), committed it already,
                        // or switched by an earlier push (a rollback would
                        // not reach it).
                        resumed |= d.runs(&self.to)
                            && match d.state {
                                DistributorPhase::Open | DistributorPhase::Idle => true,
                                DistributorPhase::Switched => {
                                    !self.changed.contains(&NodeId::Distributor(i))
                                }
                            };
                        everywhere &= d.failed_tms().contains(&id);
                    }
                    // Unreadable: it may be switched, and may steer to the TM.
                    other => {
                        everywhere = false;
                        let why = match &other {
                            Ok(Answer::Distributor(d)) => d.check().err().unwrap_or_default(),
                            _ => describe(&other),
                        };
                        unknown.push(format!("{name}: state unknown: {why}"));
                    }
                }
                self.phase = Phase::Survey {
                    i: i + 1,
                    t,
                    cause,
                    resumed,
                    everywhere,
                    unknown,
                    then,
                };
            }
            Phase::Finished => {}
        }
    }
}

impl Push {
    /// The open step: this push's table, and every TM's pinned flows.
    fn open_request(&self) -> StepRequest {
        StepRequest {
            pins: Some(self.pins.clone()),
            ..StepRequest::for_table(&self.to)
        }
    }

    /// The commit step for `node`: a distributor takes the pins, a TM the
    /// self-source ports the other TMs' pinned flows hold.
    fn commit_request(&self, node: NodeId) -> StepRequest {
        let mut req = StepRequest::for_table(&self.to);
        match node {
            NodeId::Distributor(_) => req.pins = Some(self.pins.clone()),
            NodeId::Tm(t) => {
                let me = self.spec.tms[t].0;
                let held: Vec<HeldPort> = self
                    .pins
                    .iter()
                    .filter(|p| p.tm != me)
                    .flat_map(|p| p.ports.iter().copied())
                    .collect();
                req.held = Some(held);
            }
        }
        req
    }

    /// A node that refused a change (a client error) did not change.
    fn forget_if_refused(&mut self, node: NodeId, e: &CallError) {
        if matches!(e, CallError::Status(code, _) if *code < 500) {
            self.changed.retain(|&n| n != node);
        }
    }

    /// A prepare's answer: the connections the TM has in moved buckets.
    fn prepared_answer(&self, result: Result<Answer, CallError>) -> Result<u64, CallError> {
        match result? {
            Answer::Tm(t) => {
                t.check().map_err(CallError::Garbage)?;
                match t.phase {
                    TmPhase::Prepared if t.next().as_ref() == Some(&self.to) => {
                        Ok(t.still_moving())
                    }
                    // Resumed: this node committed the table already.
                    TmPhase::Idle if t.current() == self.to => Ok(0),
                    _ => Err(CallError::Garbage(format!(
                        "it answered {} with {}, not this push's {}",
                        phase_name(t.phase),
                        t.next().unwrap_or_else(|| t.current()),
                        self.to
                    ))),
                }
            }
            other => Err(CallError::Garbage(format!("unexpected answer {other:?}"))),
        }
    }

    /// A switch's or open's answer: the distributor steers by this push's
    /// table (and is open, for `opening`).
    fn switched_answer(
        &self,
        result: Result<Answer, CallError>,
        opening: bool,
    ) -> Result<(), CallError> {
        match result? {
            Answer::Distributor(d) => {
                d.check().map_err(CallError::Garbage)?;
                let ok = d.runs(&self.to)
                    && match d.state {
                        DistributorPhase::Open => true,
                        DistributorPhase::Switched => !opening,
                        // Resumed: committed already.
                        DistributorPhase::Idle => true,
                    };
                if ok {
                    Ok(())
                } else {
                    Err(CallError::Garbage(format!(
                        "it answered {:?} on {}, not this push's {}",
                        d.state,
                        d.table(),
                        self.to
                    )))
                }
            }
            other => Err(CallError::Garbage(format!("unexpected answer {other:?}"))),
        }
    }

    /// A drain question's answer: the TM's connections in moved buckets,
    /// or that it restarted on the old table, or why its state is unknown.
    fn drain_answer(&self, result: Result<Answer, CallError>) -> Result<u64, DrainState> {
        let unknown = DrainState::Unknown;
        match result.map_err(|e| unknown(e.to_string()))? {
            Answer::Tm(t) => {
                t.check()
                    .map_err(|e| unknown(format!("unreadable state ({e})")))?;
                match t.phase {
                    TmPhase::Prepared if t.next().as_ref() == Some(&self.to) => {
                        Ok(t.still_moving())
                    }
                    TmPhase::Idle if t.current() == self.to => Ok(0),
                    TmPhase::Idle if t.current() == self.from => Err(DrainState::Restarted),
                    TmPhase::Idle => Err(unknown(format!(
                        "not prepared (idle on {}): restarted on another table?",
                        t.current()
                    ))),
                    TmPhase::Prepared => Err(unknown(format!(
                        "prepared for another table ({})",
                        t.next().map_or_else(|| "?".into(), |n| n.to_string())
                    ))),
                }
            }
            other => Err(unknown(format!("unexpected answer {other:?}"))),
        }
    }
}

/// Why a drain answer gives no count.
enum DrainState {
    /// Idle on the old table: restarted; prepare it again.
    Restarted,
    /// Anything else: why.
    Unknown(String),
}

fn phase_name(p: TmPhase) -> &'static str {
    match p {
        TmPhase::Idle => "idle",
        TmPhase::Prepared => "prepared",
    }
}
