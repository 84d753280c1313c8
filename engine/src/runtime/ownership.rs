//! Partition ownership on a shared log: engines join a Kafka consumer group on the
//! log topic, and each runs processors for the partitions the group assigns it.
//! On revocation a processor finishes its round and snapshots before the
//! partition is released. The group only decides ownership; single-writer safety
//! comes from the epochs claimed in the log (an old owner that reads a newer
//! claim stops), so a slow or partitioned engine cannot corrupt state.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::{ClientContext, TopicPartitionList};

use super::Engine;
use crate::log::LogError;
use crate::log::kafka::KafkaLogConfig;
use crate::record::PartitionId;

struct Membership {
    engine: Arc<Engine>,
    topic: String,
}

impl Membership {
    fn partitions(&self, tpl: &TopicPartitionList) -> Vec<PartitionId> {
        tpl.elements_for_topic(&self.topic)
            .iter()
            .map(|e| PartitionId(e.partition().max(0) as u32))
            .collect()
    }
}

impl ClientContext for Membership {}

impl ConsumerContext for Membership {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            for p in self.partitions(tpl) {
                tracing::info!(partition = %p, "partition revoked; stopping its processor");
                self.engine.stop_partition(p);
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                // The group consumer never reads: processors have their own readers.
                if let Err(e) = consumer.pause(tpl) {
                    tracing::warn!(error = %e, "cannot pause the membership consumer");
                }
                let owned = self.engine.owned_partitions();
                let new: Vec<PartitionId> = self
                    .partitions(tpl)
                    .into_iter()
                    .filter(|p| !owned.contains(p))
                    .collect();
                for p in &new {
                    tracing::info!(partition = %p, "partition assigned; recovering it");
                }
                for (p, started) in self.engine.start_partitions(&new) {
                    if let Err(e) = started {
                        tracing::error!(partition = %p, error = %e, "cannot take the partition");
                    }
                }
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "consumer group rebalance error"),
        }
    }
}

/// This engine's membership in the group; leaving it (drop) releases the
/// partitions to the other members.
pub struct GroupMembership {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for GroupMembership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupMembership").finish_non_exhaustive()
    }
}

impl GroupMembership {
    /// Joins `group_id` on the log topic; partitions start and stop as the group
    /// assigns and revokes them.
    pub fn join(
        engine: Arc<Engine>,
        config: &KafkaLogConfig,
        group_id: &str,
    ) -> Result<GroupMembership, LogError> {
        let mut client = config.reader_config();
        client
            .set("group.id", group_id)
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .set("partition.assignment.strategy", "range");
        let topic = config.topic.clone();
        let consumer: BaseConsumer<Membership> = client
            .create_with_context(Membership {
                engine,
                topic: topic.clone(),
            })
            .map_err(|e| LogError::Kafka(e.to_string()))?;
        consumer
            .subscribe(&[&topic])
            .map_err(|e| LogError::Kafka(e.to_string()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("tasker-group".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    // Drives heartbeats and rebalance callbacks; never yields records
                    // because every assigned partition is paused.
                    if let Some(Err(e)) = consumer.poll(Duration::from_millis(100)) {
                        tracing::debug!(error = %e, "consumer group poll");
                    }
                }
                consumer.unsubscribe();
                // Let the revoke callback run so processors stop cleanly.
                let _ = consumer.poll(Duration::from_millis(100));
            })
            .map_err(|e| LogError::Io {
                op: "spawn the group thread",
                path: Default::default(),
                source: e,
            })?;
        Ok(GroupMembership {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for GroupMembership {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
