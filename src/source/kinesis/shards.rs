//! The stream's shards, their parent/child graph, and which of them may be read now.
//!
//! Resharding closes shards and opens children: a split turns one parent into two children, a merge
//! two parents into one child. Records of one partition key move from parent to child at that moment,
//! so per-key order holds only if every parent is read to its end before its children are read at
//! all. A child is therefore readable once each of its parents is finished (read to its end by this
//! application) or gone from the stream (trimmed after the retention period: nothing is left to
//! read). The graph is rebuilt from a full, paginated `ListShards` while running, so shards created
//! by a reshard are found without a restart.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::api::{KinesisApi, KinesisError, ShardDescription, StreamRef};
use crate::retry;
use crate::shutdown::Shutdown;

/// The shards of a stream at one listing, by id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardGraph {
    shards: BTreeMap<String, ShardDescription>,
}

impl ShardGraph {
    pub fn new(shards: impl IntoIterator<Item = ShardDescription>) -> ShardGraph {
        ShardGraph {
            shards: shards
                .into_iter()
                .map(|s| (s.shard_id.clone(), s))
                .collect(),
        }
    }

    /// Every shard, in id order.
    pub fn shards(&self) -> impl Iterator<Item = &ShardDescription> {
        self.shards.values()
    }

    pub fn get(&self, shard_id: &str) -> Option<&ShardDescription> {
        self.shards.get(shard_id)
    }

    pub fn len(&self) -> usize {
        self.shards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// Shards that are open (not closed by a reshard).
    pub fn open_count(&self) -> usize {
        self.shards.values().filter(|s| !s.closed).count()
    }

    /// Shards that may be read now: not `finished`, and each parent finished or gone from the stream.
    pub fn readable(&self, finished: &HashSet<String>) -> Vec<&str> {
        self.shards
            .values()
            .filter(|s| !finished.contains(&s.shard_id))
            .filter(|s| {
                s.parents()
                    .all(|p| finished.contains(p) || !self.shards.contains_key(p))
            })
            .map(|s| s.shard_id.as_str())
            .collect()
    }
}

/// One full listing, following `NextToken` to the last page. No retries: see [`watch_shards`].
pub async fn list_shards(
    api: &dyn KinesisApi,
    stream: &StreamRef,
) -> Result<ShardGraph, KinesisError> {
    let mut shards = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = api.list_shards(stream, token.as_deref()).await?;
        shards.extend(page.shards);
        match page.next_token {
            Some(next) => token = Some(next),
            None => return Ok(ShardGraph::new(shards)),
        }
    }
}

/// Lists the shards every `interval` and publishes the graph whenever it changes, until `stop`.
/// Throttling and transient failures are retried with backoff (a listing interrupted by one starts
/// over, since a page token is short-lived); a fatal error (stream deleted, access denied) ends it.
pub async fn watch_shards(
    api: Arc<dyn KinesisApi>,
    stream: StreamRef,
    interval: Duration,
    graph: watch::Sender<Arc<ShardGraph>>,
    stop: Shutdown,
) -> Result<(), KinesisError> {
    let mut pacing = retry::backoff();
    loop {
        let listed = tokio::select! {
            listed = list_shards(api.as_ref(), &stream) => listed,
            _ = stop.requested() => return Ok(()),
        };
        let pause = match listed {
            Ok(latest) => {
                pacing = retry::backoff();
                graph.send_if_modified(|current| {
                    let changed = **current != latest;
                    if changed {
                        *current = Arc::new(latest);
                    }
                    changed
                });
                interval
            }
            Err(KinesisError::Fatal(message)) => return Err(KinesisError::Fatal(message)),
            Err(e) => {
                tracing::warn!(stream = stream.name(), error = %e, "ListShards failed; retrying");
                pacing.next().unwrap_or(interval)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.requested() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(id: &str, parents: &[&str], closed: bool) -> ShardDescription {
        ShardDescription {
            shard_id: id.into(),
            parent_shard_id: parents.first().map(|p| (*p).into()),
            adjacent_parent_shard_id: parents.get(1).map(|p| (*p).into()),
            closed,
        }
    }

    fn finished(ids: &[&str]) -> HashSet<String> {
        ids.iter().map(|s| (*s).into()).collect()
    }

    /// 0 split into 1 and 2; then 1 and 2 merged into 3.
    fn split_then_merge() -> ShardGraph {
        ShardGraph::new([
            shard("s0", &[], true),
            shard("s1", &["s0"], true),
            shard("s2", &["s0"], true),
            shard("s3", &["s1", "s2"], false),
        ])
    }

    #[test]
    fn children_wait_for_their_parent_to_be_read_to_its_end() {
        let graph = split_then_merge();
        assert_eq!(graph.readable(&finished(&[])), ["s0"]);
        assert_eq!(graph.readable(&finished(&["s0"])), ["s1", "s2"]);
    }

    #[test]
    fn a_merged_child_waits_for_both_parents() {
        let graph = split_then_merge();
        assert_eq!(graph.readable(&finished(&["s0", "s1"])), ["s2"]);
        assert_eq!(graph.readable(&finished(&["s0", "s1", "s2"])), ["s3"]);
        assert!(
            graph
                .readable(&finished(&["s0", "s1", "s2", "s3"]))
                .is_empty()
        );
    }

    #[test]
    fn a_parent_gone_from_the_stream_does_not_hold_its_children_back() {
        let graph = ShardGraph::new([
            shard("s1", &["s0"], false),
            shard("s2", &["s0"], false),
            shard("s4", &["s3", "s2"], false),
        ]);
        assert_eq!(graph.readable(&finished(&[])), ["s1", "s2"]);
        assert_eq!(graph.readable(&finished(&["s2"])), ["s1", "s4"]);
        assert_eq!(graph.open_count(), 3);
    }

    mod listing {
        use super::*;
        use crate::source::kinesis::api::{RecordsPage, ShardPage};
        use crate::source::kinesis::position::StartPosition;
        use async_trait::async_trait;
        use std::sync::Mutex;

        /// Serves `shards` two per page; `fail_first` listing calls fail with the given error.
        struct Pages {
            shards: Mutex<Vec<ShardDescription>>,
            failures: Mutex<Vec<KinesisError>>,
            calls: Mutex<Vec<Option<String>>>,
        }

        #[async_trait]
        impl KinesisApi for Pages {
            async fn list_shards(
                &self,
                _stream: &StreamRef,
                next_token: Option<&str>,
            ) -> Result<ShardPage, KinesisError> {
                self.calls
                    .lock()
                    .expect("lock")
                    .push(next_token.map(str::to_owned));
                if let Some(e) = self.failures.lock().expect("lock").pop() {
                    return Err(e);
                }
                let shards = self.shards.lock().expect("lock").clone();
                let start: usize = next_token.map_or(0, |t| t.parse().expect("token"));
                let end = (start + 2).min(shards.len());
                Ok(ShardPage {
                    shards: shards[start..end].to_vec(),
                    next_token: (end < shards.len()).then(|| end.to_string()),
                })
            }

            async fn shard_iterator(
                &self,
                _: &StreamRef,
                _: &str,
                _: &StartPosition,
            ) -> Result<String, KinesisError> {
                unreachable!("listing only")
            }

            async fn get_records(&self, _: &str, _: i32) -> Result<RecordsPage, KinesisError> {
                unreachable!("listing only")
            }
        }

        fn pages(shards: Vec<ShardDescription>, failures: Vec<KinesisError>) -> Arc<Pages> {
            Arc::new(Pages {
                shards: Mutex::new(shards),
                failures: Mutex::new(failures),
                calls: Mutex::new(Vec::new()),
            })
        }

        #[tokio::test]
        async fn a_listing_follows_every_page() {
            let api = pages(split_then_merge().shards().cloned().collect(), vec![]);
            let graph = list_shards(api.as_ref(), &StreamRef::Name("s".into()))
                .await
                .expect("listing");
            assert_eq!(graph, split_then_merge());
            let calls = api.calls.lock().expect("lock").clone();
            assert_eq!(calls, [None, Some("2".into())]);
        }

        #[tokio::test(start_paused = true)]
        async fn new_shards_are_published_while_running_and_failures_are_retried() {
            let api = pages(
                vec![shard("s0", &[], false)],
                vec![KinesisError::Throttled("slow down".into())],
            );
            let (tx, mut rx) = watch::channel(Arc::new(ShardGraph::default()));
            let stop = Shutdown::new();
            let task = tokio::spawn(watch_shards(
                api.clone(),
                StreamRef::Name("s".into()),
                Duration::from_secs(10),
                tx,
                stop.clone(),
            ));
            rx.changed().await.expect("first graph");
            assert_eq!(rx.borrow_and_update().len(), 1);

            api.shards
                .lock()
                .expect("lock")
                .extend([shard("s1", &["s0"], false), shard("s2", &["s0"], false)]);
            rx.changed().await.expect("graph after the split");
            let graph = rx.borrow_and_update().clone();
            assert_eq!(graph.len(), 3);
            assert_eq!(graph.get("s2").map(|s| s.parents().count()), Some(1));

            stop.stop();
            task.await.expect("join").expect("stopped cleanly");
        }

        #[tokio::test(start_paused = true)]
        async fn a_fatal_error_ends_the_watch() {
            let api = pages(vec![], vec![KinesisError::Fatal("stream gone".into())]);
            let (tx, _rx) = watch::channel(Arc::new(ShardGraph::default()));
            let ended = watch_shards(
                api,
                StreamRef::Name("s".into()),
                Duration::from_secs(1),
                tx,
                Shutdown::new(),
            )
            .await;
            assert_eq!(ended, Err(KinesisError::Fatal("stream gone".into())));
        }
    }
}
