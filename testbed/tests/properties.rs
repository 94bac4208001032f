//! The simulation's properties over random scenarios (proptest: a failure shrinks to a small readable scenario): symmetry, fidelity, minimal disruption, zero breakage, ports that steer home.

use allocation::{PortRange, Profile};
use proptest::prelude::*;
use testbed::scenario::Partition;
use testbed::{simulate, Event, Family, PortPattern, Report, Scenario, Timed};

/// A small, fast scenario: 200 µs between arrivals, 100 ms failure detection.
fn small(flows: u64) -> Scenario {
    Scenario {
        flows,
        arrival_ns: 200_000,
        detect_ns: 100_000_000,
        ..Scenario::default()
    }
}

fn profile() -> impl Strategy<Value = Profile> {
    prop_oneof![
        Just(Profile::Uniform),
        Just(Profile::Gaussian {
            mean: None,
            sigma: None
        }),
        Just(Profile::Rayleigh { sigma: None }),
    ]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        (any::<u64>(), 2u32..=8, 1500u64..=3000, profile(), 1u32..=3),
        (
            prop_oneof![Just(Family::V4), Just(Family::V6), Just(Family::Mixed)],
            prop_oneof![
                Just(PortPattern::Random),
                Just(PortPattern::Sequential),
                (1u16..=64).prop_map(PortPattern::Strided),
                Just(PortPattern::Fixed)
            ],
            0.0f64..0.3,
            0.0f64..0.5,
            0.0f64..0.1,
            0.0f64..0.2,
        ),
        (
            proptest::option::of((profile(), 0.1f64..0.6)),
            proptest::option::of((
                any::<u32>(),
                0.1f64..0.5,
                proptest::option::of(0.55f64..0.9),
            )),
            proptest::option::of(0.1f64..0.9),
            proptest::option::of(0.1f64..0.9),
            proptest::option::of((any::<u32>(), 0.1f64..0.9)),
            proptest::option::of(0.1f64..0.95),
            proptest::option::of((0u32..160, 0.0f64..0.9)),
        ),
        proptest::option::of((
            0usize..PARTITION_RULES.len(),
            proptest::option::of(prop_oneof![
                Just([32u8, 128u8]),
                Just([24, 64]),
                Just([8, 32])
            ]),
        )),
    )
        .prop_map(
            |(
                (seed, tms, flows, profile, distributors),
                (family, ports, udp, frag, icmp, high),
                (rebalance, fail, add, swap, drain, rollback, kill),
                partition,
            )| {
                // A second group (four TMs or more): the odd ids, under one
                // of the rules — some that split the traffic, some whose
                // replies land in the other group (connections refused,
                // never mis-steered) — hashing endpoints, or client
                // addresses (source affinity: the rule made TCP-only, the
                // TMs DNAT-only).
                let partition = partition.filter(|_| tms >= 4).map(|(r, affinity)| {
                    let mut rule = PARTITION_RULES[r].parse_rule();
                    if affinity.is_some() {
                        rule.protocol =
                            Some(allocation::rules::Protocol(allocation::rules::proto::TCP));
                    }
                    Partition {
                        rules: vec![rule],
                        tms: (0..tms).filter(|id| id % 2 == 1).collect(),
                        source_affinity: affinity,
                    }
                });
                let group_size = |id: u32| match &partition {
                    Some(p) if p.tms.contains(&id) => p.tms.len() as u32,
                    Some(p) => tms - p.tms.len() as u32,
                    None => tms,
                };
                let mut events = Vec::new();
                if let Some((p, at)) = rebalance {
                    events.push(Timed {
                        at,
                        what: Event::Rebalance(p),
                    });
                }
                if let Some((id, at, back)) = fail {
                    let id = id % tms;
                    events.push(Timed {
                        at,
                        what: Event::FailTm(id),
                    });
                    if let Some(b) = back {
                        events.push(Timed {
                            at: b,
                            what: Event::ReturnTm(id),
                        });
                    }
                }
                if let Some(at) = add {
                    events.push(Timed {
                        at,
                        what: Event::AddTm,
                    });
                }
                if let Some(at) = swap {
                    events.push(Timed {
                        at,
                        what: Event::Swap,
                    });
                }
                // A drain of a TM that does not fail in the same scenario.
                if let Some((id, at)) = drain {
                    let id = id % tms;
                    // (with three TMs or more in its group: a failure and a
                    // drain leave one)
                    if group_size(id) > 2 && !events.iter().any(|e| e.what == Event::FailTm(id)) {
                        events.push(Timed {
                            at,
                            what: Event::DrainTm(id),
                        });
                    }
                }
                if let Some(at) = rollback {
                    events.push(Timed {
                        at,
                        what: Event::Rollback,
                    });
                }
                // The coordinator of the next push killed at a random call.
                if let Some((calls, at)) = kill {
                    events.push(Timed {
                        at,
                        what: Event::CoordinatorDies(calls),
                    });
                }
                Scenario {
                    seed,
                    tms,
                    profile,
                    distributors,
                    family,
                    ports,
                    udp_share: udp,
                    fragment_share: frag,
                    icmp_share: icmp,
                    high_port_share: high,
                    events,
                    partition,
                    ..small(flows)
                }
            },
        )
}

/// The second group's rules the random scenarios draw from: by port (the
/// 8443 virtual server's flows, or a part of the client and SNAT ports),
/// by protocol, by the servers' prefixes (whose replies then land in it:
/// the default group's connections are refused).
const PARTITION_RULES: [RuleText; 6] = [
    RuleText(None, Some("8443"), None),
    RuleText(Some(allocation::rules::proto::TCP), Some("8443"), None),
    RuleText(Some(allocation::rules::proto::UDP), None, None),
    RuleText(None, Some("40000-40999"), None),
    RuleText(None, None, Some("10.2.0.0/24")),
    RuleText(
        Some(allocation::rules::proto::TCP),
        None,
        Some("2001:db8:2::/64"),
    ),
];

/// A rule as constants: protocol, ports, prefix.
#[derive(Debug, Clone, Copy)]
struct RuleText(Option<u8>, Option<&'static str>, Option<&'static str>);

impl RuleText {
    fn parse_rule(self) -> allocation::Rule {
        allocation::Rule {
            protocol: self.0.map(allocation::rules::Protocol),
            ports: self.1.map(|p| p.parse().expect("ports")),
            prefix: self.2.map(|p| p.parse().expect("prefix")),
        }
    }
}

/// Properties 1, 3, 4 and 5 on one report.
fn check(r: &Report) -> Result<(), TestCaseError> {
    let f = &r.flows;
    let c = &r.checks;
    // 5. Every port steers its reply home; no two TMs share a SNAT port.
    prop_assert_eq!(c.wrong_port, 0);
    prop_assert_eq!(c.port_collision, 0);
    // Every frame to a TM carries its MAC; every frame from a TM is bridged.
    prop_assert_eq!(c.bad_rewrite, 0);
    prop_assert_eq!(c.bad_bridge, 0);
    prop_assert_eq!(c.not_steered, 0);
    // 1. Symmetry: no packet of a flow reaches another TM than its owner,
    // UDP sessions in moved buckets included (pinned past the commit,
    // DESIGN §4).
    prop_assert_eq!(f.split, 0, "split flows: {:?}", f.split_examples);
    // 4. Zero breakage: flows break only with a failed TM (and those are that TM's).
    for (cause, n) in &f.broken {
        prop_assert!(
            matches!(cause.as_str(), "tm_failed" | "dead_tm"),
            "{} flows broken: {}",
            n,
            cause
        );
    }
    let failed: Vec<u32> = r
        .scenario
        .events
        .iter()
        .filter_map(|e| match e.what {
            Event::FailTm(id) => Some(id),
            _ => None,
        })
        .collect();
    for tm in f.broken_by_failed_tm.keys() {
        prop_assert!(
            failed.contains(tm),
            "flows of TM {} broke, failed: {:?}",
            tm,
            failed
        );
    }
    // 3. Minimal disruption: every change moved exactly the minimum.
    for e in &r.events {
        prop_assert_eq!(e.moved_buckets, e.optimum, "{}", e.what);
        // (a TM that died during a push never drains: the window runs out)
        prop_assert!(
            !e.forced_commit || !e.tms_failed_during.is_empty(),
            "{}: drain window ran out",
            e.what
        );
    }
    // Nothing accepted is lost: every started flow ended, one way or another.
    let refused: u64 = f.refused.values().sum();
    prop_assert_eq!(f.started, f.completed + refused + r.broken());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        max_shrink_iters: 200,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_scenario_keeps_flows_whole(sc in scenario()) {
        let r = simulate(sc).map_err(|e| TestCaseError::fail(e.to_string()))?;
        check(&r)?;
        // Traffic flowed: every flow not refused (a partition whose replies
        // land in the other group refuses its connections) sent packets.
        let refused: u64 = r.flows.refused.values().sum();
        prop_assert!(r.packets > (r.flows.started - refused) * 3);
    }
}

#[test]
fn fidelity_shares_follow_the_table_before_and_after_a_rebalance() {
    let sc = Scenario {
        seed: 11,
        tms: 8,
        profile: Profile::Gaussian {
            mean: None,
            sigma: None,
        },
        udp_share: 0.1,
        events: vec![Timed {
            at: 0.4,
            what: Event::Rebalance(Profile::Uniform),
        }],
        ..small(60_000)
    };
    let r = simulate(sc).expect("simulate");
    check(&r).expect("properties");
    assert_eq!(r.phases.len(), 2);
    for p in &r.phases {
        assert!(p.flows > 20_000, "{} flows after {}", p.flows, p.after);
        // 2. Fidelity: within 1 percentage point of the target, and the
        // counts pass a chi-square test against the table.
        assert!(
            p.max_abs_diff < 0.01,
            "after {}: {}",
            p.after,
            p.max_abs_diff
        );
        assert!(p.p_value > 0.001, "after {}: p = {}", p.after, p.p_value);
    }
    let (before, after) = (&r.phases[0], &r.phases[1]);
    assert!(before.tms[0].target < 0.06 && after.tms[0].target == 0.125);
    // The test has power: the first phase's counts fail against the second's targets.
    let observed: Vec<u64> = before.tms.iter().map(|t| t.flows).collect();
    let wrong: Vec<f64> = after
        .tms
        .iter()
        .map(|t| t.target * before.flows as f64)
        .collect();
    let (x, dof) = testbed::stats::chi_square(&observed, &wrong);
    assert!(testbed::stats::chi_square_p(x, dof) < 1e-9);
}

#[test]
fn exhausted_ports_are_refused_never_wrong() {
    let sc = Scenario {
        seed: 3,
        snat_range: PortRange {
            lo: 40_000,
            hi: 40_060,
        },
        arrival_ns: 20_000,
        events: vec![Timed {
            at: 0.5,
            what: Event::Rebalance(Profile::Gaussian {
                mean: None,
                sigma: None,
            }),
        }],
        ..small(3000)
    };
    let r = simulate(sc).expect("simulate");
    check(&r).expect("properties");
    let refused = r.flows.refused.get("port_exhausted").copied().unwrap_or(0);
    assert!(refused > 1000, "{refused}");
    assert!(r.checks.ports_leased > 50);
}

#[test]
fn a_commit_before_the_drain_keeps_flows_on_their_pins() {
    // Commit the transition at once: the connections and sessions still
    // open in moved buckets are pinned to their old owners (DESIGN §4).
    let sc = Scenario {
        seed: 5,
        drain_window_ns: 0,
        udp_share: 0.3,
        events: vec![Timed {
            at: 0.5,
            what: Event::Rebalance(Profile::Gaussian {
                mean: None,
                sigma: None,
            }),
        }],
        ..small(3000)
    };
    let r = simulate(sc.clone()).expect("simulate");
    assert!(r.events[0].forced_commit);
    assert!(r.events[0].moving_at_commit > 0);
    assert_eq!(r.flows.split, 0, "{:?}", r.flows.split_examples);
    assert!(r.flows.broken.is_empty(), "{:?}", r.flows.broken);
    assert_eq!(r.checks.wrong_port + r.checks.port_collision, 0);
    // The checks can fail: without room for pins the same commit moves
    // established flows to their new owner.
    let r = simulate(Scenario { pins: 0, ..sc }).expect("simulate");
    assert!(r.flows.broken.get("misrouted").copied().unwrap_or(0) > 0);
    assert!(!r.violations().is_empty());
    assert!(!r.flows.split_examples.is_empty());
}

#[test]
fn a_small_transition_memory_overflows_gracefully() {
    let sc = Scenario {
        seed: 8,
        transit_memory: 4,
        events: vec![Timed {
            at: 0.3,
            what: Event::Rebalance(Profile::Rayleigh { sigma: None }),
        }],
        ..small(3000)
    };
    let r = simulate(sc).expect("simulate");
    check(&r).expect("properties");
    assert!(r.checks.transit_overflows > 0);
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let sc = Scenario {
        seed: 99,
        family: Family::Mixed,
        distributors: 2,
        events: vec![Timed {
            at: 0.5,
            what: Event::AddTm,
        }],
        ..small(2000)
    };
    let (a, b) = (simulate(sc.clone()).expect("a"), simulate(sc).expect("b"));
    assert_eq!(a.packets, b.packets);
    assert_eq!(a.flows.completed, b.flows.completed);
    let shares = |r: &Report| -> Vec<u64> {
        r.phases
            .iter()
            .flat_map(|p| p.tms.iter().map(|t| t.flows))
            .collect()
    };
    assert_eq!(shares(&a), shares(&b));
}

/// A source-affinity group (TCP 8443, `hash = "address"`, DNAT-only TMs)
/// beside the default group: its connections keep the client's endpoint,
/// and a rebalance of both groups under traffic neither refuses nor breaks
/// one — the connections in its moved buckets included (their replies
/// take the request's steering decision, which the distributors' transition
/// memory keeps on one TM).
#[test]
fn a_source_affinity_group_keeps_client_addresses_through_a_rebalance() {
    let sc = Scenario {
        seed: 5,
        tms: 6,
        ports: PortPattern::Fixed,
        high_port_share: 0.5,
        udp_share: 0.1,
        partition: Some(Partition {
            rules: vec![allocation::Rule {
                protocol: Some(allocation::rules::Protocol(allocation::rules::proto::TCP)),
                ports: Some("8443".parse().expect("ports")),
                prefix: None,
            }],
            tms: vec![1, 3, 5],
            source_affinity: Some([32, 128]),
        }),
        events: vec![Timed {
            at: 0.3,
            what: Event::Rebalance(Profile::Gaussian {
                mean: None,
                sigma: None,
            }),
        }],
        drain_window_ns: 20_000_000_000,
        ..small(30_000)
    };
    let r = simulate(sc).expect("simulate");
    check(&r).expect("properties");
    let refused: u64 = r.flows.refused.values().sum();
    assert_eq!(refused, 0, "{:?}", r.flows.refused);
    // Nothing broken, UDP sessions of moved buckets included.
    assert!(r.flows.broken.is_empty(), "{:?}", r.flows.broken);
    // About half the flows are the group's TCP ones.
    assert!(
        r.checks.addresses_kept > 10_000,
        "{}",
        r.checks.addresses_kept
    );
    assert!(r.events.iter().all(|e| e.moved_buckets > 0));
    // Both groups' TMs served in both phases.
    for p in &r.phases {
        assert!(p.tms.iter().all(|t| t.flows > 0), "after {}", p.after);
    }
}

/// The base of scenarios the property test found (no fragments, ICMP
/// errors or high ports; a 5 s drain window), to be filled in as found.
fn found(flows: u64) -> Scenario {
    Scenario {
        fragment_share: 0.0,
        icmp_share: 0.0,
        high_port_share: 0.0,
        drain_window_ns: 5_000_000_000,
        ..small(flows)
    }
}

#[test]
fn a_table_swap_after_a_rebalance_keeps_the_pins_in_force() {
    // A table installed outright (stdd's PUT /table) while UDP sessions
    // are pinned must carry their pins.
    let sc = Scenario {
        seed: 14_625_375_088_603_001_923,
        tms: 4,
        profile: Profile::Uniform,
        distributors: 1,
        family: Family::V4,
        ports: PortPattern::Strided(58),
        udp_share: 0.245_070_759_126_761_7,
        events: vec![
            Timed {
                at: 0.333_545_387_424_081_3,
                what: Event::Rebalance(Profile::Rayleigh { sigma: None }),
            },
            Timed {
                at: 0.357_181_427_484_608_24,
                what: Event::Swap,
            },
        ],
        partition: None,
        ..found(2000)
    };
    check(&simulate(sc).expect("simulate")).expect("properties");
}

#[test]
fn a_new_owners_udp_query_is_remembered_by_a_distributor_not_yet_open() {
    // Three distributors a side, opened one after the other: a UDP session
    // a joining TM starts through an open front distributor must have its
    // server's answer reach it through a back distributor still switched.
    let sc = Scenario {
        seed: 699_039_297_808_758_048,
        tms: 6,
        profile: Profile::Rayleigh { sigma: None },
        distributors: 3,
        family: Family::V6,
        ports: PortPattern::Sequential,
        udp_share: 0.129_637_778_954_914_46,
        events: vec![
            Timed {
                at: 0.1,
                what: Event::FailTm(0),
            },
            Timed {
                at: 0.877_028_566_804_239_9,
                what: Event::ReturnTm(0),
            },
        ],
        partition: Some(Partition {
            rules: vec![allocation::Rule {
                protocol: None,
                ports: Some("8443".parse().expect("ports")),
                prefix: None,
            }],
            tms: vec![1, 3, 5],
            source_affinity: None,
        }),
        ..found(1883)
    };
    check(&simulate(sc).expect("simulate")).expect("properties");
}

/// A rebalance, then `stdctl rollback` under the same traffic (UDP included).
fn rebalance_then_rollback(flows: u64) -> Scenario {
    Scenario {
        seed: 11,
        tms: 4,
        udp_share: 0.4,
        events: vec![
            Timed {
                at: 0.2,
                what: Event::Rebalance(Profile::Gaussian {
                    mean: None,
                    sigma: None,
                }),
            },
            Timed {
                at: 0.6,
                what: Event::Rollback,
            },
        ],
        ..small(flows)
    }
}

#[test]
fn a_rollback_puts_the_previous_tables_buckets_back_and_breaks_no_flow() {
    let r = simulate(rebalance_then_rollback(4000)).expect("simulate");
    check(&r).expect("properties");
    assert_eq!(r.events.len(), 2, "{:?}", r.events);
    let back = &r.events[1];
    assert_eq!(back.rolled_back, None, "{back:?}");
    assert!(back.moved_buckets > 0 && back.window_ms > 0.0, "{back:?}");
    // The running table after it: version 3, the buckets of version 1.
    let (first, last) = (&r.phases[0], &r.phases[r.phases.len() - 1]);
    assert_eq!(last.version, 3);
    let targets =
        |p: &testbed::report::PhaseReport| -> Vec<f64> { p.tms.iter().map(|t| t.target).collect() };
    assert_eq!(targets(first), targets(last));
    assert_ne!(
        targets(first),
        targets(&r.phases[1]),
        "the rebalance moved nothing"
    );
    // UDP sessions lived through both changes.
    assert!(r.flows.started > 3000 && r.broken() == 0, "{:?}", r.flows);
}

#[test]
fn a_rollback_with_nothing_committed_before_is_refused_and_changes_nothing() {
    let sc = Scenario {
        events: vec![Timed {
            at: 0.5,
            what: Event::Rollback,
        }],
        ..small(500)
    };
    let r = simulate(sc).expect("simulate");
    check(&r).expect("properties");
    assert!(r.events[0].rolled_back.is_some(), "{:?}", r.events);
    assert_eq!(r.phases.last().map(|p| p.version), Some(1));
}

#[test]
fn a_coordinator_killed_after_any_call_is_resumed_and_breaks_no_flow() {
    // Every call of the push in turn: prepare, switch, pins, open, drain,
    // verify, commit; the second run of the push finishes it.
    let mut phases = std::collections::BTreeSet::new();
    let (mut calls, mut runs) = (0, 0);
    while runs < 400 {
        runs += 1;
        let mut sc = rebalance_then_rollback(500);
        sc.tms = 3;
        sc.events.push(Timed {
            at: 0.0,
            what: Event::CoordinatorDies(calls),
        });
        let r = simulate(sc).expect("simulate");
        check(&r).unwrap_or_else(|e| panic!("killed after {calls} calls: {e}"));
        let push = &r.events[0];
        assert_eq!(push.rolled_back, None, "killed after {calls} calls");
        // Committed: the rebalance's table ran, then the rollback's.
        assert_eq!(r.phases.last().map(|p| p.version), Some(3), "{calls}");
        match &push.coordinator_killed {
            Some(k) => {
                let call = k.split(' ').next().unwrap_or_default().to_string();
                // Each call before the drain; the drain's polls (one per TM
                // each round) by strides.
                calls += if call == "tm-state" { 5 } else { 1 };
                phases.insert(call);
            }
            // Past the push's last call: it was the rollback's to die.
            None => break,
        }
    }
    for p in [
        "prepare",
        "switch",
        "pins",
        "open",
        "tm-state",
        "distributor-state",
        "commit",
    ] {
        assert!(phases.contains(p), "never killed after a {p}: {phases:?}");
    }
}

/// A rebalance, and TM `id` dying at `fail_at` while it is under way.
fn fail_during_rebalance(fail_at: f64) -> Scenario {
    Scenario {
        seed: 5,
        tms: 5,
        udp_share: 0.3,
        events: vec![
            Timed {
                at: 0.2,
                what: Event::Rebalance(Profile::Rayleigh { sigma: None }),
            },
            Timed {
                at: fail_at,
                what: Event::FailTm(3),
            },
        ],
        // The dead TM never drains: the window runs out, then the push
        // leaves it out and commits.
        drain_window_ns: 300_000_000,
        ..small(4000)
    }
}

#[test]
fn a_tm_failing_during_a_push_is_failed_over_in_both_tables_and_the_push_finishes() {
    let r = simulate(fail_during_rebalance(0.3)).expect("simulate");
    check(&r).expect("properties");
    let (push, fail) = (&r.events[0], &r.events[1]);
    assert!(fail.what.contains("during a transition"), "{fail:?}");
    assert_eq!(push.tms_failed_during, vec![3]);
    // Committed, the dead TM left out: the rebalance's table (failed over) runs.
    assert_eq!(push.rolled_back, None, "{push:?}");
    let last = &r.phases[r.phases.len() - 1];
    assert_eq!(last.version, 2, "{:?}", r.phases);
    assert!(last.tms.iter().any(|t| t.id == 3 && t.target == 0.0));
    assert!(last.flows > 0 && last.tms.iter().all(|t| t.id == 3 || t.flows > 0));
    // Only TM 3's flows broke, and some did (it died under load).
    assert!(r.broken() > 0);
    assert!(r.flows.broken_by_failed_tm.keys().all(|&k| k == 3));
}

#[test]
fn a_tm_failing_as_a_push_prepares_rolls_it_back_onto_its_failover() {
    // Dead before its prepare: the push is refused and rolled back; the
    // distributors run the old table's failover.
    let mut sc = fail_during_rebalance(0.2);
    sc.events[1].at = 0.20025; // the next arrival: prepares have begun, not tm3's
    let r = simulate(sc).expect("simulate");
    check(&r).expect("properties");
    let push = &r.events[0];
    assert!(
        push.rolled_back
            .as_deref()
            .is_some_and(|c| c.contains("tm3")),
        "{push:?}"
    );
    let last = &r.phases[r.phases.len() - 1];
    assert_eq!(last.version, 1);
    assert!(
        last.tms.iter().any(|t| t.id == 3 && t.target == 0.0),
        "{last:?}"
    );
}

#[test]
fn found_a_udp_session_on_a_returning_tms_buckets_stays_whole() {
    // (found by every_scenario_keeps_flows_whole)
    let sc = Scenario {
        seed: 680575927047213519,
        tms: 4,
        profile: Profile::Rayleigh { sigma: None },
        udp_share: 0.06059640310172237,
        events: vec![
            Timed {
                at: 0.1,
                what: Event::FailTm(0),
            },
            Timed {
                at: 0.6497299448147864,
                what: Event::ReturnTm(0),
            },
            Timed {
                at: 0.6682733161551639,
                what: Event::AddTm,
            },
        ],
        partition: Some(Partition {
            rules: vec![allocation::Rule {
                protocol: Some(allocation::rules::Protocol(allocation::rules::proto::TCP)),
                ports: None,
                prefix: None,
            }],
            tms: vec![1, 3],
            source_affinity: Some([32, 128]),
        }),
        ..small(1527)
    };
    let r = simulate(sc).expect("simulate");
    check(&r).expect("properties");
}

/// Found by `every_scenario_keeps_flows_whole`: a TM fails while a push
/// adds a TM. The failover table (from the operator's, which does not list
/// the TM being added yet) reached the joining TM too, and its allocator
/// refused it — the simulation stopped with "TM id 2 is not in the table".
/// tmd refuses a table that does not list it and keeps its own; so does
/// the simulated TM now, and every property holds.
#[test]
fn a_tm_failing_while_a_push_adds_one_keeps_every_property() {
    let sc = Scenario {
        seed: 550_273_438_425_518,
        tms: 2,
        udp_share: 0.0,
        fragment_share: 0.0,
        icmp_share: 0.0,
        events: vec![
            Timed {
                at: 0.372_062_166_413_219_15,
                what: Event::FailTm(0),
            },
            Timed {
                at: 0.369_021_309_008_896_74,
                what: Event::AddTm,
            },
        ],
        ..small(1500)
    };
    let r = simulate(sc).expect("simulate");
    check(&r).expect("properties");
}

/// Found by `every_scenario_keeps_flows_whole`: a TM fails and returns, a
/// second is drained, and the operator rolls back to the table before the
/// drain — a push that readmits the drained TM, refused or carried out,
/// never an error of the simulation.
#[test]
fn a_rollback_of_a_drain_after_a_failover_and_return_keeps_every_property() {
    let sc = Scenario {
        seed: 0,
        tms: 3,
        udp_share: 0.0,
        fragment_share: 0.0,
        icmp_share: 0.0,
        events: vec![
            Timed {
                at: 0.1,
                what: Event::FailTm(1),
            },
            Timed {
                at: 0.55,
                what: Event::ReturnTm(1),
            },
            Timed {
                at: 0.855_431_722_891_377_8,
                what: Event::DrainTm(2),
            },
            Timed {
                at: 0.715_436_205_648_927_3,
                what: Event::Rollback,
            },
        ],
        ..small(1500)
    };
    let r = simulate(sc).expect("simulate");
    check(&r).expect("properties");
}

/// Found by `every_scenario_keeps_flows_whole`: a rebalance with a
/// source-affinity group (DNAT-only TMs) beside the endpoint-hash one,
/// client ports above the servers'.
#[test]
fn a_rebalance_beside_a_source_affinity_group_keeps_every_port_home() {
    let sc = Scenario {
        seed: 15_852_557_494_659_788_573,
        tms: 4,
        profile: Profile::Rayleigh { sigma: None },
        family: Family::V6,
        ports: PortPattern::Strided(1),
        udp_share: 0.0,
        fragment_share: 0.0,
        icmp_share: 0.0,
        high_port_share: 0.186_641_608_356_976_9,
        events: vec![Timed {
            at: 0.1,
            what: Event::Rebalance(Profile::Uniform),
        }],
        partition: Some(Partition {
            rules: vec![PARTITION_RULES[1].parse_rule()],
            tms: vec![1, 3],
            source_affinity: Some([32, 128]),
        }),
        ..small(1500)
    };
    let r = simulate(sc).expect("simulate");
    check(&r).expect("properties");
}
