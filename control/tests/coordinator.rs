//! The transition coordinator against scripted in-memory nodes that time out, answer garbage or errors, die after a phase or come back on another table: the cluster always ends committed on one table, rolled back, or stopped switched with the culprits named — never split.

use std::time::Duration;

use allocation::{AllocationTable, GroupSpec, HashKey, MacAddr, Profile, Tm};
use control::api::{
    AbortAnswer, CommitAnswer, DistributorPhase, DistributorTransition, FailedOver, HeldPort,
    PinnedFlow, TableId, TmPhase, TmPins, TmTransition,
};
use control::coordinator::{Answer, Call, CallError, NodeId, Outcome, Push, PushSpec, Step};
use proptest::prelude::*;

fn table(version: u64, profile: Profile) -> AllocationTable {
    let tms = (0..3)
        .map(|i| Tm {
            id: i,
            name: format!("tm{i}"),
            mac: MacAddr([2, 0x53, 0x54, 0, 0, i as u8 + 1]),
            weight: 1,
            group: 0,
        })
        .collect();
    let t = AllocationTable::new(
        4,
        HashKey::from_bytes([6; 16]),
        tms,
        vec![GroupSpec::default_group(Profile::Uniform)],
    )
    .expect("table");
    if version == 4 {
        return t;
    }
    t.rebalance(0, &profile).expect("rebalance").table
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// No answer, nothing done.
    Silent,
    /// Done, but the answer is lost (a time-out after the fact).
    Lost,
    /// 500, nothing done.
    Error500,
    /// 200 with a body that is not the message (`{}`), done.
    Garbage,
    /// Dead from now on.
    Die,
    /// Restarts now, back on the table it started with, then answers.
    Restart,
}

#[derive(Debug, Clone)]
struct Node {
    table: TableId,
    other: Option<TableId>,
    open: bool,
    dead: bool,
    calls: usize,
    /// The table it starts with (the last one it committed).
    disk: TableId,
    moving: Vec<u64>,
    polls: usize,
    /// The pins a distributor was last given, the held ports a TM was.
    pins: Option<Vec<TmPins>>,
    held: Option<Vec<HeldPort>>,
    /// The held ports a joining TM was last prepared with.
    prepared_held: Option<Vec<HeldPort>>,
    /// A distributor restarted while switched to this table (stdd's
    /// transition marker): it drops what it cannot place until pins come
    /// with an open, or a commit or an abort.
    recovering: Option<TableId>,
    /// A distributor's failover: the TMs its probes found dead.
    failed: Vec<u32>,
}

struct Fake {
    dists: Vec<Node>,
    tms: Vec<Node>,
    faults: Vec<(NodeId, usize, Fault)>,
    /// Faults of every drain question (GET /transition) to a TM.
    state_faults: Vec<(NodeId, Fault)>,
    said: Vec<String>,
}

impl Fake {
    fn new(from: &TableId, moving: Vec<u64>) -> Self {
        let node = Node {
            table: from.clone(),
            other: None,
            open: false,
            dead: false,
            calls: 0,
            disk: from.clone(),
            moving,
            polls: 0,
            pins: None,
            held: None,
            prepared_held: None,
            recovering: None,
            failed: Vec::new(),
        };
        Fake {
            dists: vec![node.clone(), node.clone()],
            tms: vec![node.clone(), node.clone(), node],
            faults: Vec::new(),
            state_faults: Vec::new(),
            said: Vec::new(),
        }
    }

    fn node(&mut self, n: NodeId) -> &mut Node {
        match n {
            NodeId::Distributor(i) => &mut self.dists[i],
            NodeId::Tm(i) => &mut self.tms[i],
        }
    }

    fn dist_state(n: &Node) -> DistributorTransition {
        // Failed over: it steers by a table derived from the operator's
        // (another checksum), and names what it derives from.
        let derived = |t: &TableId| match n.failed.is_empty() {
            true => t.clone(),
            false => TableId {
                version: t.version,
                checksum: format!("{}-without-{:?}", t.checksum, n.failed),
            },
        };
        let failed_over = (!n.failed.is_empty()).then(|| FailedOver {
            table: n.table.clone(),
            previous: n.other.clone(),
            tms: n.failed.clone(),
        });
        let (table, other) = (derived(&n.table), n.other.as_ref().map(derived));
        DistributorTransition {
            state: match (&n.other, n.open) {
                (None, _) => DistributorPhase::Idle,
                (Some(_), false) => DistributorPhase::Switched,
                (Some(_), true) => DistributorPhase::Open,
            },
            version: table.version,
            checksum: table.checksum,
            previous_version: other.as_ref().map(|p| p.version),
            previous_checksum: other.map(|p| p.checksum),
            moved_buckets: n.other.as_ref().map(|_| 1),
            remembered_flows: 0,
            overflows: 0,
            pinned_flows: None,
            pins_refused: None,
            recovering: n.recovering.clone(),
            failed_over,
        }
    }

    fn tm_state(n: &mut Node) -> TmTransition {
        let moving = n.other.as_ref().map(|_| {
            let m = n.moving.get(n.polls).copied().unwrap_or(0);
            n.polls += 1;
            m
        });
        TmTransition {
            phase: if n.other.is_some() {
                TmPhase::Prepared
            } else {
                TmPhase::Idle
            },
            current: n.table.version,
            current_checksum: n.table.checksum.clone(),
            next: n.other.as_ref().map(|t| t.version),
            next_checksum: n.other.as_ref().map(|t| t.checksum.clone()),
            connections_in_moved_buckets: moving,
            ports_in_moved_buckets: moving,
        }
    }

    /// What a real node does with `call` (the node semantics of stdd and tmd).
    fn apply(&mut self, id: NodeId, call: &Call, to: &TableId) -> Result<Answer, CallError> {
        let conflict = |s: &str| Err(CallError::Status(409, s.into()));
        let n = self.node(id);
        match (id, call) {
            (NodeId::Tm(_), Call::Prepare(req)) => match &n.other {
                Some(t) if t == to => {
                    // tmd: a joiner prepared again takes the longer list.
                    if req.held.is_some() {
                        n.prepared_held = req.held.clone();
                    }
                    Ok(Answer::Tm(Self::tm_state(n)))
                }
                Some(_) => conflict("another transition is prepared"),
                None if n.table == *to => Ok(Answer::Tm(Self::tm_state(n))),
                None => {
                    n.other = Some(to.clone());
                    n.prepared_held = req.held.clone();
                    n.polls = 0;
                    Ok(Answer::Tm(Self::tm_state(n)))
                }
            },
            // Each TM's open connections hold a port of its own.
            (NodeId::Tm(i), Call::HeldPorts) => Ok(Answer::Held(vec![HeldPort(
                "10.20.0.100".parse().expect("ip"),
                4242 + i as u16,
            )])),
            (NodeId::Tm(_), Call::TmState) => Ok(Answer::Tm(Self::tm_state(n))),
            (NodeId::Tm(i), Call::Pins) => Ok(Answer::Pins(TmPins {
                tm: i as u32,
                table: n.other.clone().unwrap_or_else(|| n.table.clone()),
                flows: vec![PinnedFlow(
                    17,
                    format!("192.0.2.{}:40000", i + 1).parse().expect("addr"),
                    "198.51.100.1:53".parse().expect("addr"),
                    30_000,
                )],
                ports: vec![HeldPort(
                    "10.20.0.100".parse().expect("ip"),
                    5000 + i as u16,
                )],
            })),
            (NodeId::Distributor(_), Call::Switch(_)) => match &n.other {
                Some(_) if n.table == *to => Ok(Answer::Distributor(Self::dist_state(n))),
                Some(_) => conflict("already switched"),
                None if n.table == *to => Ok(Answer::Distributor(Self::dist_state(n))),
                None => {
                    n.other = Some(std::mem::replace(&mut n.table, to.clone()));
                    n.open = false;
                    Ok(Answer::Distributor(Self::dist_state(n)))
                }
            },
            (NodeId::Distributor(_), Call::Open(req)) => {
                n.pins = req.pins.clone();
                let t = &req.table().expect("named").expect("a table");
                if n.table != *t {
                    return conflict("not switched to this table");
                }
                if n.other.is_some() {
                    n.open = true;
                    if req.pins.is_some() {
                        n.recovering = None;
                    }
                }
                Ok(Answer::Distributor(Self::dist_state(n)))
            }
            (NodeId::Distributor(_), Call::DistributorState) => {
                Ok(Answer::Distributor(Self::dist_state(n)))
            }
            (NodeId::Distributor(_), Call::Commit(req)) => {
                n.pins = req.pins.clone();
                let t = &req.table().expect("named").expect("a table");
                if n.table != *t {
                    return conflict("not switched to this table");
                }
                n.other = None;
                n.open = false;
                n.disk = t.clone();
                n.recovering = None;
                Ok(Answer::Committed(CommitAnswer {
                    table: t.clone(),
                    persist_error: None,
                    pins_refused: None,
                }))
            }
            (NodeId::Tm(_), Call::Commit(req)) => {
                n.held = req.held.clone();
                let t = &req.table().expect("named").expect("a table");
                match &n.other {
                    Some(x) if x == t => {
                        n.table = t.clone();
                        n.disk = t.clone();
                        n.other = None;
                        Ok(Answer::Committed(CommitAnswer {
                            table: t.clone(),
                            persist_error: None,
                            pins_refused: None,
                        }))
                    }
                    None if n.table == *t => Ok(Answer::Committed(CommitAnswer {
                        table: t.clone(),
                        persist_error: None,
                        pins_refused: None,
                    })),
                    _ => conflict("not prepared for this table"),
                }
            }
            (NodeId::Distributor(_), Call::Abort(_))
                if n.other.is_none() && n.recovering.is_some() =>
            {
                n.recovering = None;
                Ok(Answer::Aborted(AbortAnswer {
                    table: n.table.clone(),
                    aborted: true,
                }))
            }
            (NodeId::Distributor(_), Call::Abort(t)) => match &n.other {
                Some(_) if t.as_ref().is_none_or(|t| *t == n.table) => {
                    n.table = n.other.take().expect("previous");
                    n.open = false;
                    n.recovering = None;
                    Ok(Answer::Aborted(AbortAnswer {
                        table: n.table.clone(),
                        aborted: true,
                    }))
                }
                Some(_) => conflict("switched to another table"),
                None if t.as_ref() == Some(&n.table) => conflict("committed already"),
                None => Ok(Answer::Aborted(AbortAnswer {
                    table: n.table.clone(),
                    aborted: false,
                })),
            },
            (NodeId::Tm(_), Call::Abort(t)) => match &n.other {
                Some(x) if t.as_ref().is_none_or(|t| t == x) => {
                    n.other = None;
                    Ok(Answer::Aborted(AbortAnswer {
                        table: n.table.clone(),
                        aborted: true,
                    }))
                }
                Some(_) => conflict("prepared for another table"),
                None if t.as_ref() == Some(&n.table) => conflict("committed already"),
                None => Ok(Answer::Aborted(AbortAnswer {
                    table: n.table.clone(),
                    aborted: false,
                })),
            },
            _ => Err(CallError::Status(404, "not found".into())),
        }
    }

    fn carry(&mut self, id: NodeId, call: &Call, to: &TableId) -> Result<Answer, CallError> {
        let k = {
            let n = self.node(id);
            n.calls += 1;
            n.calls
        };
        let fault = self
            .faults
            .iter()
            .find(|&&(n, c, _)| n == id && c == k)
            .map(|&(_, _, f)| f)
            .or_else(|| {
                self.state_faults
                    .iter()
                    .find(|&&(n, _)| n == id && *call == Call::TmState)
                    .map(|&(_, f)| f)
            });
        if fault == Some(Fault::Die) {
            self.node(id).dead = true;
            if let NodeId::Tm(t) = id {
                // The distributors' probes find it dead and fail it over.
                for d in &mut self.dists {
                    if !d.failed.contains(&(t as u32)) {
                        d.failed.push(t as u32);
                    }
                }
            }
        }
        if self.node(id).dead {
            return Err(CallError::NoAnswer("connection refused".into()));
        }
        match fault {
            None | Some(Fault::Die) => self.apply(id, call, to),
            Some(Fault::Silent) => Err(CallError::NoAnswer("timed out".into())),
            Some(Fault::Error500) => Err(CallError::Status(500, "scripted".into())),
            Some(Fault::Lost) => {
                let _ = self.apply(id, call, to);
                Err(CallError::NoAnswer("timed out".into()))
            }
            Some(Fault::Garbage) => {
                let _ = self.apply(id, call, to);
                Err(CallError::Garbage("missing field `phase`".into()))
            }
            Some(Fault::Restart) => {
                let n = self.node(id);
                // Comes back on the table it last committed; a distributor
                // switched to another one recovers (its marker names it).
                if matches!(id, NodeId::Distributor(_)) && n.table != n.disk {
                    n.recovering = Some(n.table.clone());
                }
                // Its probes start over: no TM failed yet.
                n.failed.clear();
                n.table = n.disk.clone();
                n.other = None;
                n.open = false;
                n.polls = 0;
                self.apply(id, call, to)
            }
        }
    }

    fn run(&mut self, push: &mut Push) -> Outcome {
        let to = push.target().clone();
        let mut now = Duration::ZERO;
        for _ in 0..100_000 {
            match push.step(now) {
                Step::Call(node, call) => {
                    now += Duration::from_millis(1);
                    let r = self.carry(node, &call, &to);
                    push.answer(r, now);
                }
                Step::WaitUntil(t) => {
                    assert!(t > now, "waits move forward");
                    now = t;
                }
                Step::Say(line) => self.said.push(line),
                Step::Done(o) => return o,
            }
        }
        panic!("the push does not end");
    }

    fn all(&self) -> Vec<(String, &Node)> {
        let d = self.dists.iter().enumerate().map(|(i, n)| (dname(i), n));
        let t = self
            .tms
            .iter()
            .enumerate()
            .map(|(i, n)| (format!("tm{i}"), n));
        d.chain(t).collect()
    }
}

fn dname(i: usize) -> String {
    ["front", "back"][i].to_string()
}

fn spec(force: bool) -> PushSpec {
    PushSpec {
        distributors: vec![dname(0), dname(1)],
        tms: (0..3).map(|i| (i, format!("tm{i}"))).collect(),
        drain_window: Duration::from_secs(5),
        poll: Duration::from_millis(250),
        attempts: 3,
        force,
    }
}

fn tables() -> (AllocationTable, AllocationTable) {
    (
        table(4, Profile::Uniform),
        table(
            5,
            Profile::Custom {
                weights: vec![2.0, 1.0, 1.0],
            },
        ),
    )
}

/// The property every ending must have: committed → every node runs `to`
/// alone; rolled back → every node not named runs `from` alone; stopped →
/// every distributor not named steers by `to`, and every TM not named is
/// prepared for or runs `to`.
fn check_ending(fake: &Fake, outcome: &Outcome, from: &TableId, to: &TableId) {
    let named = |name: &str, text: &str| text.contains(name);
    match outcome {
        Outcome::Committed(s) => {
            assert_eq!(&s.to, to);
            for (name, n) in fake.all() {
                if n.dead {
                    continue;
                }
                assert_eq!(&n.table, to, "{name} committed");
                assert!(n.other.is_none(), "{name} alone on the new table");
                assert!(n.recovering.is_none(), "{name} recovered");
            }
        }
        Outcome::RolledBack {
            cause,
            not_rolled_back,
        } => {
            let listed = not_rolled_back.join("; ");
            for (name, n) in fake.all() {
                if named(&name, &listed) {
                    continue;
                }
                assert!(!n.dead || named(&name, cause), "{name} dead but not named");
                if n.dead {
                    continue;
                }
                assert_eq!(&n.table, from, "{name} rolled back ({cause})");
                assert!(n.other.is_none(), "{name} left in a transition ({cause})");
                assert!(n.recovering.is_none(), "{name} recovered ({cause})");
            }
        }
        Outcome::Stopped { cause } => {
            for (name, n) in fake.all() {
                if named(&name, cause) || n.dead {
                    continue;
                }
                if name.starts_with("tm") {
                    assert!(
                        n.other.as_ref() == Some(to) || (&n.table == to && n.other.is_none()),
                        "{name} neither prepared for nor on {to} ({cause})"
                    );
                } else {
                    assert_eq!(&n.table, to, "{name} steers by the new table ({cause})");
                }
            }
        }
    }
}

#[test]
fn a_clean_push_waits_for_the_drain_then_commits_everything() {
    let (from, to) = tables();
    let mut fake = Fake::new(&TableId::of(&from), vec![4, 2, 0]);
    let mut push = Push::new(spec(false), &from, &to).expect("push");
    let out = fake.run(&mut push);
    let Outcome::Committed(s) = &out else {
        panic!("{out:?}")
    };
    assert_eq!(s.moving_at_commit, 0);
    // Prepare answered 4, the first round 2, the second 0.
    assert!(
        s.drain >= Duration::from_millis(250),
        "waited for the drain: {:?}",
        s.drain
    );
    check_ending(&fake, &out, &TableId::of(&from), &TableId::of(&to));
}

#[test]
fn a_tm_of_unknown_state_is_never_drained() {
    // Defect 1: no answer, 500, `{}` — each is unknown, not "0 left".
    for fault in [Fault::Silent, Fault::Error500, Fault::Garbage] {
        let (from, to) = tables();
        let mut fake = Fake::new(&TableId::of(&from), vec![0]);
        fake.state_faults.push((NodeId::Tm(1), fault));
        let mut push = Push::new(spec(false), &from, &to).expect("push");
        let out = fake.run(&mut push);
        let Outcome::Stopped { cause } = &out else {
            panic!("{fault:?}: {out:?}")
        };
        assert!(
            cause.contains("tm1") && cause.contains("unknown"),
            "{cause}"
        );
        // Nothing committed; everyone still switched or prepared.
        check_ending(&fake, &out, &TableId::of(&from), &TableId::of(&to));
        assert!(
            fake.dists.iter().all(|d| d.other.is_some()),
            "{fault:?}: left switched"
        );
        assert!(fake
            .said
            .iter()
            .any(|l| l.contains("tm1") && l.contains("not counted as drained")));
        // With --force the operator commits regardless.
        let mut fake = Fake::new(&TableId::of(&from), vec![0]);
        fake.state_faults.push((NodeId::Tm(1), fault));
        let mut push = Push::new(spec(true), &from, &to).expect("push");
        let out = fake.run(&mut push);
        let Outcome::Committed(s) = &out else {
            panic!("{out:?}")
        };
        assert_eq!(s.unknown_at_commit.len(), 1, "{s:?}");
        assert!(s.drain >= Duration::from_secs(5), "waited the whole window");
    }
}

#[test]
fn a_tm_restarted_during_the_drain_is_prepared_again_not_counted_as_drained() {
    let (from, to) = tables();
    let mut fake = Fake::new(&TableId::of(&from), vec![3, 3, 0]);
    fake.faults.push((NodeId::Tm(2), 3, Fault::Restart));
    let mut push = Push::new(spec(false), &from, &to).expect("push");
    let out = fake.run(&mut push);
    assert!(matches!(out, Outcome::Committed(_)), "{out:?}");
    assert!(
        fake.said
            .iter()
            .any(|l| l.contains("tm2") && l.contains("prepared again")),
        "{:?}",
        fake.said
    );
    check_ending(&fake, &out, &TableId::of(&from), &TableId::of(&to));
    // Restarted on another table (not the one it ran): unknown, never drained.
    let mut fake = Fake::new(&TableId::of(&from), vec![0]);
    fake.tms[2].disk = TableId {
        version: 3,
        checksum: "fnv1a64:0".into(),
    };
    fake.faults.push((NodeId::Tm(2), 3, Fault::Restart));
    let mut push = Push::new(spec(false), &from, &to).expect("push");
    let out = fake.run(&mut push);
    let Outcome::Stopped { cause } = &out else {
        panic!("{out:?}")
    };
    assert!(cause.contains("tm2"), "{cause}");
}

#[test]
fn a_timed_out_prepare_or_switch_is_rolled_back_too() {
    // Defect 2: the node whose call timed out may have acted: it is aborted.
    for (node, k) in [(NodeId::Tm(1), 1), (NodeId::Distributor(1), 1)] {
        let (from, to) = tables();
        let mut fake = Fake::new(&TableId::of(&from), vec![0]);
        fake.faults.push((node, k, Fault::Lost));
        let mut push = Push::new(spec(false), &from, &to).expect("push");
        let out = fake.run(&mut push);
        let Outcome::RolledBack {
            not_rolled_back, ..
        } = &out
        else {
            panic!("{out:?}")
        };
        assert!(not_rolled_back.is_empty(), "{not_rolled_back:?}");
        check_ending(&fake, &out, &TableId::of(&from), &TableId::of(&to));
    }
}

#[test]
fn a_node_that_dies_after_switch_is_named_not_rolled_back() {
    let (from, to) = tables();
    let mut fake = Fake::new(&TableId::of(&from), vec![0]);
    // back: switch (1) ok, then dies at open (2): rollback cannot reach it.
    fake.faults.push((NodeId::Distributor(1), 2, Fault::Die));
    let mut push = Push::new(spec(false), &from, &to).expect("push");
    let out = fake.run(&mut push);
    let Outcome::RolledBack {
        not_rolled_back,
        cause,
    } = &out
    else {
        panic!("{out:?}")
    };
    assert!(cause.contains("back"), "{cause}");
    assert_eq!(not_rolled_back.len(), 1, "{not_rolled_back:?}");
    assert!(
        not_rolled_back[0].starts_with("back: "),
        "{not_rolled_back:?}"
    );
    check_ending(&fake, &out, &TableId::of(&from), &TableId::of(&to));
    // Rollback retried before giving up.
    assert_eq!(fake.dists[1].calls, 2 + 3);
}

#[test]
fn a_rollback_retries_a_node_that_answers_late() {
    let (from, to) = tables();
    let mut fake = Fake::new(&TableId::of(&from), vec![0]);
    fake.faults
        .push((NodeId::Distributor(1), 1, Fault::Error500)); // switch fails
    fake.faults.push((NodeId::Distributor(0), 3, Fault::Silent)); // first abort lost
    let mut push = Push::new(spec(false), &from, &to).expect("push");
    let out = fake.run(&mut push);
    let Outcome::RolledBack {
        not_rolled_back, ..
    } = &out
    else {
        panic!("{out:?}")
    };
    assert!(not_rolled_back.is_empty(), "{not_rolled_back:?}");
    check_ending(&fake, &out, &TableId::of(&from), &TableId::of(&to));
}

#[test]
fn a_distributor_restarted_on_the_old_table_is_switched_again_before_the_commit() {
    let (from, to) = tables();
    let mut fake = Fake::new(&TableId::of(&from), vec![2, 0]);
    // front: switch, open, then (3) the state question before commit: restarted.
    fake.faults
        .push((NodeId::Distributor(0), 3, Fault::Restart));
    let mut push = Push::new(spec(false), &from, &to).expect("push");
    let out = fake.run(&mut push);
    assert!(matches!(out, Outcome::Committed(_)), "{out:?}");
    check_ending(&fake, &out, &TableId::of(&from), &TableId::of(&to));
    assert!(fake.said.iter().any(|l| l.contains("switching it again")));
    // It came back recovering: not opened with the pins read before its
    // restart, but left to the commit's, read after.
    let after: Vec<&String> = fake
        .said
        .iter()
        .skip_while(|l| !l.contains("switching it again"))
        .collect();
    assert!(
        after
            .iter()
            .any(|l| l.contains("recovering until the commit's pins")),
        "{after:?}"
    );
    assert!(
        !after.iter().any(|l| l.starts_with("open ")),
        "reopened with stale pins: {after:?}"
    );
    let pins_after = after.iter().filter(|l| l.starts_with("pins ")).count();
    assert_eq!(pins_after, 3, "the commit's pins read after: {after:?}");
}

#[test]
fn a_distributor_restarted_while_switched_and_left_is_recovered_by_a_resume_or_an_abort() {
    for abort in [false, true] {
        let (from, to) = tables();
        let mut fake = Fake::new(&TableId::of(&from), vec![0]);
        // The push stops at the drain (tm0 unknown); then front restarts.
        fake.state_faults.push((NodeId::Tm(0), Fault::Silent));
        let mut push = Push::new(spec(false), &from, &to).expect("push");
        let out = fake.run(&mut push);
        assert!(matches!(out, Outcome::Stopped { .. }), "{out:?}");
        fake.state_faults.clear();
        let front = &mut fake.dists[0];
        front.recovering = Some(front.table.clone());
        front.table = front.disk.clone();
        front.other = None;
        front.open = false;
        if abort {
            // stdctl abort: every node, the recovering one included.
            let nodes = [0, 1].map(NodeId::Distributor).into_iter();
            for n in nodes.chain([0, 1, 2].map(NodeId::Tm)) {
                let a = fake.apply(n, &Call::Abort(None), &TableId::of(&to));
                assert!(matches!(a, Ok(Answer::Aborted(_))), "{n:?}: {a:?}");
            }
            for (name, n) in fake.all() {
                assert_eq!(n.table, TableId::of(&from), "{name}");
                assert!(n.other.is_none() && n.recovering.is_none(), "{name}");
            }
        } else {
            let mut again = Push::new(spec(false), &from, &to).expect("push");
            let out = fake.run(&mut again);
            assert!(matches!(out, Outcome::Committed(_)), "{out:?}");
            check_ending(&fake, &out, &TableId::of(&from), &TableId::of(&to));
        }
        assert!(fake.dists[0].recovering.is_none());
    }
}

#[test]
fn a_tm_that_fails_during_the_drain_is_left_out_once_every_distributor_failed_it_over() {
    for everywhere in [true, false] {
        let (from, to) = tables();
        let mut fake = Fake::new(&TableId::of(&from), vec![3, 1, 0]);
        // tm1: prepare (1), pins (2), then dead at its first drain question.
        fake.faults.push((NodeId::Tm(1), 3, Fault::Die));
        if !everywhere {
            // The back distributor's probes have not found it yet.
            fake.faults
                .push((NodeId::Distributor(1), 3, Fault::Restart));
        }
        let mut push = Push::new(spec(false), &from, &to).expect("push");
        let out = fake.run(&mut push);
        check_ending(&fake, &out, &TableId::of(&from), &TableId::of(&to));
        if everywhere {
            let Outcome::Committed(s) = &out else {
                panic!("{out:?}")
            };
            assert!(
                s.warnings
                    .iter()
                    .any(|w| w.starts_with("tm1: failed over by every distributor")),
                "{:?}",
                s.warnings
            );
            assert!(s.unknown_at_commit.is_empty(), "{:?}", s.unknown_at_commit);
            // Steering by their failover tables, the distributors were
            // still recognised as switched to, then committed on, the push's table.
            for d in &fake.dists {
                assert_eq!(d.table, TableId::of(&to));
                assert_eq!(d.failed, vec![1]);
            }
        } else {
            let Outcome::Stopped { cause } = &out else {
                panic!("{out:?}")
            };
            assert!(cause.contains("state of tm1 is unknown"), "{cause}");
        }
    }
}

#[test]
fn a_second_push_of_the_same_table_resumes() {
    let (from, to) = tables();
    let mut fake = Fake::new(&TableId::of(&from), vec![0]);
    fake.state_faults.push((NodeId::Tm(0), Fault::Silent));
    let mut push = Push::new(spec(false), &from, &to).expect("push");
    let out = fake.run(&mut push);
    assert!(matches!(out, Outcome::Stopped { .. }), "{out:?}");
    fake.state_faults.clear();
    let mut again = Push::new(spec(false), &from, &to).expect("push");
    let out = fake.run(&mut again);
    assert!(matches!(out, Outcome::Committed(_)), "{out:?}");
    check_ending(&fake, &out, &TableId::of(&from), &TableId::of(&to));
}

#[test]
fn a_resumed_push_never_rolls_the_tms_back_alone_for_a_dead_one() {
    for everywhere in [true, false] {
        let (from, to) = tables();
        // A first push stops open (tm0's drain state unknown) ...
        let mut fake = Fake::new(&TableId::of(&from), vec![0]);
        fake.state_faults.push((NodeId::Tm(0), Fault::Silent));
        let mut push = Push::new(spec(false), &from, &to).expect("push");
        let out = fake.run(&mut push);
        assert!(matches!(out, Outcome::Stopped { .. }), "{out:?}");
        assert!(fake.dists.iter().all(|d| d.open));
        fake.state_faults.clear();
        // ... and tm1 dies before the second run: its prepare gets no answer.
        fake.tms[1].dead = true;
        if everywhere {
            for d in &mut fake.dists {
                d.failed = vec![1];
            }
        }
        let mut again = Push::new(spec(false), &from, &to).expect("push");
        let out = fake.run(&mut again);
        if everywhere {
            // Left out: the push finishes over the failover.
            let Outcome::Committed(s) = &out else {
                panic!("{out:?}")
            };
            assert!(
                s.warnings
                    .iter()
                    .any(|w| w.starts_with("tm1: failed over by every distributor")),
                "{:?}",
                s.warnings
            );
            for d in &fake.dists {
                assert_eq!((&d.table, &d.other), (&TableId::of(&to), &None));
            }
            for k in [0, 2] {
                assert_eq!(fake.tms[k].table, TableId::of(&to), "tm{k}");
            }
        } else {
            // Stopped as it is: the distributors stay open, the other TMs
            // prepared — a rollback would have aborted the TMs alone.
            let Outcome::Stopped { cause } = &out else {
                panic!("{out:?}")
            };
            assert!(
                cause.contains("tm1: prepare") && cause.contains("nothing rolled back"),
                "{cause}"
            );
            assert!(fake.dists.iter().all(|d| d.open && d.other.is_some()));
            for k in [0, 2] {
                assert_eq!(fake.tms[k].other, Some(TableId::of(&to)), "tm{k}");
            }
        }
    }
}

#[test]
fn a_distributor_dead_when_a_failed_prepare_asks_it_is_named_in_the_rollback() {
    // (found by never_split) tm0's prepare gets no answer; the front
    // distributor, asked whether an earlier push switched it, is dead.
    let (from, to) = tables();
    let mut fake = Fake::new(&TableId::of(&from), vec![0]);
    fake.faults.push((NodeId::Tm(0), 1, Fault::Silent));
    fake.faults.push((NodeId::Distributor(0), 1, Fault::Die));
    let mut push = Push::new(spec(false), &from, &to).expect("push");
    let out = fake.run(&mut push);
    let Outcome::RolledBack { cause, .. } = &out else {
        panic!("{out:?}")
    };
    assert!(
        cause.contains("tm0: prepare") && cause.contains(&format!("{}: state unknown", dname(0))),
        "{cause}"
    );
    check_ending(&fake, &out, &TableId::of(&from), &TableId::of(&to));
}

#[test]
fn an_older_table_and_a_drain_with_a_join_are_refused_before_anything() {
    let (from, to) = tables();
    assert!(Push::new(spec(false), &to, &from)
        .expect_err("older")
        .contains("not newer"));
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        Just(Fault::Silent),
        Just(Fault::Lost),
        Just(Fault::Error500),
        Just(Fault::Garbage),
        Just(Fault::Die),
        Just(Fault::Restart),
    ]
}

fn node() -> impl Strategy<Value = NodeId> {
    prop_oneof![
        (0usize..2).prop_map(NodeId::Distributor),
        (0usize..3).prop_map(NodeId::Tm),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]
    /// Whatever fails, wherever: never split.
    #[test]
    fn never_split(faults in proptest::collection::vec((node(), 1usize..12, fault()), 0..5), force in any::<bool>()) {
        let (from, to) = tables();
        let mut fake = Fake::new(&TableId::of(&from), vec![3, 1, 0]);
        fake.faults = faults;
        let mut push = Push::new(spec(force), &from, &to).expect("push");
        let out = fake.run(&mut push);
        check_ending(&fake, &out, &TableId::of(&from), &TableId::of(&to));
    }
}

#[test]
fn a_tm_restarted_before_its_pins_are_read_is_prepared_again_even_with_force() {
    // Found by never_split: tm0 restarts (back idle on the old table) just
    // before its pins are read for the commit; the front's commit answer is
    // lost. --force must not commit past a TM whose NAT follows the old table.
    for force in [false, true] {
        let (from, to) = tables();
        let mut fake = Fake::new(&TableId::of(&from), vec![3, 1, 0]);
        fake.faults = vec![
            (NodeId::Distributor(0), 4, Fault::Garbage),
            (NodeId::Tm(0), 5, Fault::Restart),
        ];
        let mut push = Push::new(spec(force), &from, &to).expect("push");
        let out = fake.run(&mut push);
        check_ending(&fake, &out, &TableId::of(&from), &TableId::of(&to));
        assert!(
            fake.said.iter().any(|l| l.contains("prepared again")),
            "{:?}",
            fake.said
        );
    }
}

#[test]
fn every_tms_pinned_flows_reach_every_distributor_and_their_ports_the_other_tms() {
    let (from, to) = tables();
    let mut fake = Fake::new(&TableId::of(&from), vec![2, 0]);
    let mut push = Push::new(spec(false), &from, &to).expect("push");
    let out = fake.run(&mut push);
    let Outcome::Committed(s) = &out else {
        panic!("{out:?}")
    };
    assert_eq!(s.pinned_at_commit, 3, "one flow from each TM");
    for d in &fake.dists {
        let pins = d.pins.as_ref().expect("the commit carries pins");
        let mut tms: Vec<u32> = pins.iter().map(|p| p.tm).collect();
        tms.sort_unstable();
        assert_eq!(tms, vec![0, 1, 2]);
    }
    for (i, t) in fake.tms.iter().enumerate() {
        let held = t.held.as_ref().expect("the commit carries held ports");
        let mut ports: Vec<u16> = held.iter().map(|h| h.1).collect();
        ports.sort_unstable();
        let others: Vec<u16> = (0..3)
            .filter(|&j| j != i)
            .map(|j| 5000 + j as u16)
            .collect();
        assert_eq!(ports, others, "tm{i} holds the others' ports, not its own");
    }
    // Asked once before the open, once before the commit.
    let asked = fake.said.iter().filter(|l| l.starts_with("pins ")).count();
    assert_eq!(asked, 6, "{:?}", fake.said);
}

#[test]
fn a_tm_whose_pins_cannot_be_read_stops_the_push_before_open_or_commit() {
    // Before the open (TM call 2): rolled back, nothing opened.
    let (from, to) = tables();
    let mut fake = Fake::new(&TableId::of(&from), vec![0]);
    fake.faults.push((NodeId::Tm(1), 2, Fault::Silent));
    let mut push = Push::new(spec(false), &from, &to).expect("push");
    let out = fake.run(&mut push);
    let Outcome::RolledBack { cause, .. } = &out else {
        panic!("{out:?}")
    };
    assert!(
        cause.contains("tm1") && cause.contains("pinned flows"),
        "{cause}"
    );
    assert!(fake.dists.iter().all(|d| !d.open));
    check_ending(&fake, &out, &TableId::of(&from), &TableId::of(&to));
    // Before the commit (TM call 4: prepare, pins, drain, pins): stopped
    // switched, nothing committed — its sessions would be cut otherwise.
    let mut fake = Fake::new(&TableId::of(&from), vec![0]);
    fake.faults.push((NodeId::Tm(1), 4, Fault::Garbage));
    let mut push = Push::new(spec(false), &from, &to).expect("push");
    let out = fake.run(&mut push);
    let Outcome::Stopped { cause } = &out else {
        panic!("{out:?}")
    };
    assert!(
        cause.contains("tm1") && cause.contains("nothing committed"),
        "{cause}"
    );
    assert!(
        fake.dists.iter().all(|d| d.other.is_some()),
        "still switched"
    );
    // With --force it commits, and says so.
    let mut fake = Fake::new(&TableId::of(&from), vec![0]);
    fake.faults.push((NodeId::Tm(1), 4, Fault::Garbage));
    let mut push = Push::new(spec(true), &from, &to).expect("push");
    let Outcome::Committed(s) = fake.run(&mut push) else {
        panic!("forced")
    };
    assert!(
        s.warnings
            .iter()
            .any(|w| w.contains("tm1") && w.contains("--force")),
        "{:?}",
        s.warnings
    );
}

/// Two TMs join at once (a drained TM readmitted while its pinned flows
/// still hold ports, and a new one): each is prepared with the ports every
/// other TM's open connections hold — the members' and the other
/// joiner's, whichever was prepared first (the first one again, once the
/// second's are known). Before, the second joiner could take a port the
/// first one's pinned UDP session still held toward the same server (found
/// by the simulator).
#[test]
fn two_joiners_are_each_prepared_with_the_others_ports() {
    let base = table(4, Profile::Uniform);
    let from = base
        .rebalance_to_targets(0, &[0, 0, 4096], None)
        .expect("only tm2")
        .table;
    let to = from
        .rebalance_to_targets(0, &[1366, 1365, 1365], None)
        .expect("all three")
        .table;
    let mut fake = Fake::new(&TableId::of(&from), vec![0, 0, 0]);
    let mut push = Push::new(spec(false), &from, &to).expect("push");
    let out = fake.run(&mut push);
    assert!(matches!(out, Outcome::Committed(_)), "{out:?}");
    for (i, t) in fake.tms.iter().enumerate().take(2) {
        let held = t.prepared_held.as_ref().expect("prepared as a joiner");
        let mut ports: Vec<u16> = held.iter().map(|h| h.1).collect();
        ports.sort_unstable();
        let others: Vec<u16> = (0..3)
            .filter(|&j| j != i)
            .map(|j| 4242 + j as u16)
            .collect();
        for p in others {
            assert!(
                ports.contains(&p),
                "tm{i} held {ports:?}, not {p}: {:?}",
                fake.said
            );
        }
    }
    check_ending(&fake, &out, &TableId::of(&from), &TableId::of(&to));
}
