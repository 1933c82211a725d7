//! How many shard leases a process should hold, and whose lease it may take.
//!
//! Processes never talk to each other; each looks at the lease table and acts alone, so the rule must
//! converge when every process applies it, and must not oscillate. The target is an even share,
//! ⌈readable shards / live processes⌉, where the live processes are the owners of unexpired leases
//! plus the process itself (a process that holds nothing yet is invisible to the others, so it is
//! the one that must act). A process below its target first takes free or expired leases. Only when
//! none are left does it take one lease from the busiest holder, and only if that holder has at least
//! two more than itself: moving one lease then makes the spread strictly smaller, so with five shards
//! and two processes the split stays 3/2 instead of the odd shard bouncing between them. One steal
//! per round keeps each move small and gives the holder time to notice.

use std::collections::{HashMap, HashSet};

/// One lease row as a process sees it when planning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseView {
    pub shard_id: String,
    pub owner: Option<String>,
    pub epoch: i64,
    /// Unexpired by the database's clock.
    pub live: bool,
}

/// What a process should try this round.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Its even share.
    pub target: usize,
    /// Leases it holds now (among the readable shards).
    pub held: usize,
    /// Free or expired leases it may take, at most `target - held` of them.
    pub free: Vec<LeaseView>,
    pub take: usize,
    /// A lease to take from the busiest holder, when nothing is free and the spread allows it.
    pub steal: Option<LeaseView>,
}

/// The plan for `me`, over the leases of the shards that are readable now (`eligible`).
pub fn plan(me: &str, leases: &[LeaseView], eligible: &HashSet<&str>) -> Plan {
    let leases: Vec<&LeaseView> = leases
        .iter()
        .filter(|l| eligible.contains(l.shard_id.as_str()))
        .collect();
    let mut per_owner: HashMap<&str, Vec<&LeaseView>> = HashMap::new();
    for lease in &leases {
        if let Some(owner) = live_owner(lease) {
            per_owner.entry(owner).or_default().push(lease);
        }
    }
    let processes = per_owner.len() + usize::from(!per_owner.contains_key(me));
    let target = eligible.len().div_ceil(processes);
    // A lease of mine that expired is still mine to renew: the epoch has not moved, so nobody else
    // has read the shard since.
    let held = leases
        .iter()
        .filter(|l| l.owner.as_deref() == Some(me))
        .count();
    let free: Vec<LeaseView> = leases
        .iter()
        .filter(|l| l.owner.as_deref() != Some(me) && live_owner(l).is_none())
        .map(|l| (*l).clone())
        .collect();
    let take = target.saturating_sub(held).min(free.len());
    let steal = if free.is_empty() && held < target {
        busiest_other(&per_owner, me)
            .filter(|(_, theirs)| theirs.len() >= held + 2)
            .and_then(|(_, theirs)| {
                theirs
                    .iter()
                    .max_by_key(|l| &l.shard_id)
                    .map(|l| (*l).clone())
            })
    } else {
        None
    };
    Plan {
        target,
        held,
        free,
        take,
        steal,
    }
}

fn live_owner(lease: &LeaseView) -> Option<&str> {
    lease.owner.as_deref().filter(|_| lease.live)
}

/// The other process holding the most leases (ties broken by name, so the choice is stable).
fn busiest_other<'a>(
    per_owner: &HashMap<&'a str, Vec<&'a LeaseView>>,
    me: &str,
) -> Option<(&'a str, Vec<&'a LeaseView>)> {
    per_owner
        .iter()
        .filter(|(owner, _)| **owner != me)
        .max_by(|a, b| a.1.len().cmp(&b.1.len()).then_with(|| b.0.cmp(a.0)))
        .map(|(owner, leases)| (*owner, leases.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shards(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("shardId-{i:012}")).collect()
    }

    /// Leases over `n` shards, the first `counts[0]` held by "p0", the next `counts[1]` by "p1", …;
    /// the rest free.
    fn table(n: usize, counts: &[usize]) -> Vec<LeaseView> {
        let mut owners = counts
            .iter()
            .enumerate()
            .flat_map(|(p, &c)| std::iter::repeat_n(format!("p{p}"), c));
        shards(n)
            .into_iter()
            .map(|shard_id| {
                let owner = owners.next();
                LeaseView {
                    shard_id,
                    live: owner.is_some(),
                    owner,
                    epoch: 1,
                }
            })
            .collect()
    }

    /// Lets every process in turn apply its plan (taking what it may, at most one steal) until a
    /// full round changes nothing; returns the final counts and the number of rounds.
    fn settle(n: usize, processes: usize, mut leases: Vec<LeaseView>) -> (Vec<usize>, usize) {
        let ids = shards(n);
        let eligible: HashSet<&str> = ids.iter().map(String::as_str).collect();
        for round in 1..=200 {
            let mut changed = false;
            for p in 0..processes {
                let me = format!("p{p}");
                let plan = plan(&me, &leases, &eligible);
                let mut moves: Vec<String> = plan
                    .free
                    .iter()
                    .take(plan.take)
                    .map(|l| l.shard_id.clone())
                    .collect();
                moves.extend(plan.steal.map(|l| l.shard_id));
                for shard in moves {
                    let lease = leases
                        .iter_mut()
                        .find(|l| l.shard_id == shard)
                        .expect("row");
                    lease.owner = Some(me.clone());
                    lease.live = true;
                    lease.epoch += 1;
                    changed = true;
                }
            }
            if !changed {
                let counts = (0..processes)
                    .map(|p| {
                        let me = format!("p{p}");
                        leases
                            .iter()
                            .filter(|l| l.owner.as_deref() == Some(&me))
                            .count()
                    })
                    .collect();
                return (counts, round);
            }
        }
        panic!("leases never settled");
    }

    #[test]
    fn a_lone_process_takes_every_free_lease() {
        let plan = plan(
            "p0",
            &table(4, &[]),
            &shards(4).iter().map(String::as_str).collect(),
        );
        assert_eq!((plan.target, plan.take), (4, 4));
        assert!(plan.steal.is_none());
    }

    #[test]
    fn a_newcomer_steals_one_lease_per_round_from_the_busiest() {
        let ids = shards(4);
        let eligible = ids.iter().map(String::as_str).collect();
        let plan = plan("p1", &table(4, &[4]), &eligible);
        assert_eq!(plan.target, 2);
        assert_eq!(plan.take, 0);
        let stolen = plan.steal.expect("a steal");
        assert_eq!(stolen.owner.as_deref(), Some("p0"));
    }

    #[test]
    fn two_processes_split_evenly_and_an_odd_shard_does_not_bounce() {
        assert_eq!(settle(4, 2, table(4, &[4])).0, vec![2, 2]);
        let (counts, _) = settle(5, 2, table(5, &[5]));
        assert_eq!(counts, vec![3, 2]);
        // Already 3/2: nobody moves.
        let ids = shards(5);
        let eligible = ids.iter().map(String::as_str).collect();
        for me in ["p0", "p1"] {
            let plan = plan(me, &table(5, &[3, 2]), &eligible);
            assert_eq!(
                (plan.take, plan.steal),
                (0, None),
                "{me} would move a lease"
            );
        }
    }

    #[test]
    fn three_processes_converge_within_one_of_each_other() {
        for (n, start) in [
            (4, vec![4, 0, 0]),
            (4, vec![2, 2, 0]),
            (64, vec![64, 0, 0]),
            (7, vec![0, 0, 0]),
        ] {
            let (counts, _) = settle(n, 3, table(n, &start));
            let (min, max) = (
                counts.iter().min().unwrap_or(&0),
                counts.iter().max().unwrap_or(&0),
            );
            assert_eq!(counts.iter().sum::<usize>(), n, "{counts:?}");
            assert!(max - min <= 1, "{n} shards from {start:?} ended {counts:?}");
            assert!(*max <= n.div_ceil(3), "{counts:?}");
        }
    }

    #[test]
    fn expired_leases_are_free_but_my_own_stay_mine() {
        let mut leases = table(3, &[1, 2]);
        for lease in &mut leases {
            lease.live = false;
        }
        let ids = shards(3);
        let eligible = ids.iter().map(String::as_str).collect();
        let plan = plan("p0", &leases, &eligible);
        assert_eq!(plan.held, 1, "my expired lease is renewed, not retaken");
        assert_eq!(plan.target, 3, "dead processes do not count");
        assert_eq!(plan.take, 2);
        assert!(plan.free.iter().all(|l| l.owner.as_deref() == Some("p1")));
    }

    #[test]
    fn shards_that_are_not_readable_yet_are_not_counted() {
        let leases = table(4, &[]);
        let ids = shards(4);
        let eligible: HashSet<&str> = ids[..2].iter().map(String::as_str).collect();
        let plan = plan("p0", &leases, &eligible);
        assert_eq!((plan.target, plan.take), (2, 2));
        assert!(
            plan.free
                .iter()
                .all(|l| eligible.contains(l.shard_id.as_str()))
        );
    }
}
