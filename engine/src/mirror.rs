//! The JSON mirror: republishes every event of the log as a CloudEvents 1.0
//! structured JSON message to a Kafka topic (`mirror.topic`, default
//! `tasker.events.json`), so consumers in any language need no bincode. Started
//! by `tasker run` on the Kafka backend when `mirror.enabled`.
//!
//! Each engine mirrors the partitions it owns, as the subscriber
//! `tasker-mirror` (its positions are that consumer group's committed offsets on
//! the log topic), at least once: offsets are committed after the broker
//! acknowledged the mirrored messages, so a crash may publish some again; the
//! CloudEvent `id` (`<partition>-<position>`) identifies duplicates. Log partition
//! `p` is mirrored to partition `p` of the mirror topic (created with the log's
//! partition count if missing), keyed by task id, so a task's events stay in order.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};

use crate::log::kafka::{KafkaLog, KafkaLogConfig};
use crate::log::{Log, LogError};
use crate::record::PartitionId;
use crate::subscribe::{Filter, KafkaCursors, StartAt, Subscriber};

/// The consumer group whose offsets record how far the mirror got.
pub const GROUP: &str = "tasker-mirror";

/// Counts failed deliveries, so a batch with one is not committed.
#[derive(Default)]
struct Deliveries {
    failed: AtomicU64,
}

struct Context(Arc<Deliveries>);

impl ClientContext for Context {}

impl ProducerContext for Context {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: Self::DeliveryOpaque) {
        if let Err((e, _)) = result {
            tracing::warn!(error = %e, "mirror: a message was not delivered");
            self.0.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A running mirror; stops when dropped.
pub struct Mirror {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    published: Arc<AtomicU64>,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("published", &self.published.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Mirror {
    /// Creates the mirror topic if needed and starts mirroring the partitions
    /// `owned` returns (asked again every round, as ownership moves).
    pub fn start(
        log: Arc<dyn Log>,
        kafka: &KafkaLogConfig,
        topic: &str,
        owned: impl Fn() -> Vec<PartitionId> + Send + 'static,
    ) -> Result<Mirror, LogError> {
        drop(KafkaLog::open(KafkaLogConfig::new(
            &kafka.brokers,
            topic,
            kafka.partitions,
        ))?);
        let deliveries = Arc::new(Deliveries::default());
        let producer: BaseProducer<Context> = kafka
            .producer_config()
            .create_with_context(Context(Arc::clone(&deliveries)))
            .map_err(|e| LogError::Kafka(e.to_string()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let published = Arc::new(AtomicU64::new(0));
        let worker = Worker {
            log,
            kafka: kafka.clone(),
            topic: topic.to_owned(),
            producer,
            deliveries,
            stop: Arc::clone(&stop),
            published: Arc::clone(&published),
        };
        let thread = std::thread::Builder::new()
            .name("tasker-mirror".into())
            .spawn(move || worker.run(owned))
            .map_err(|e| LogError::Kafka(format!("cannot start the mirror thread: {e}")))?;
        Ok(Mirror {
            stop,
            thread: Some(thread),
            published,
        })
    }

    /// Events published so far by this process.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Worker {
    log: Arc<dyn Log>,
    kafka: KafkaLogConfig,
    topic: String,
    producer: BaseProducer<Context>,
    deliveries: Arc<Deliveries>,
    stop: Arc<AtomicBool>,
    published: Arc<AtomicU64>,
}

impl Worker {
    fn run(self, owned: impl Fn() -> Vec<PartitionId>) {
        let mut current: Vec<PartitionId> = Vec::new();
        let mut sub: Option<Subscriber> = None;
        while !self.stop.load(Ordering::Relaxed) {
            let mut now = owned();
            now.sort_unstable();
            if now.is_empty() {
                sub = None;
                current.clear();
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            if sub.is_none() || now != current {
                match self.open(&now) {
                    Ok(s) => {
                        sub = Some(s);
                        current = now;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "mirror: cannot open the subscription; retrying");
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                }
            }
            let Some(s) = sub.as_mut() else { continue };
            match self.round(s) {
                Ok(n) => {
                    self.published.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => {
                    // Start again from the committed offsets: at least once.
                    tracing::warn!(error = %e, "mirror: round failed; resuming from the last commit");
                    sub = None;
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
        let _ = self.producer.flush(Duration::from_secs(10));
    }

    fn open(
        &self,
        partitions: &[PartitionId],
    ) -> Result<Subscriber, crate::subscribe::SubscribeError> {
        let cursors = KafkaCursors::new(&self.kafka, GROUP)?;
        Subscriber::open(
            GROUP,
            Arc::clone(&self.log),
            partitions,
            Filter::default(),
            StartAt::Earliest,
            Box::new(cursors),
        )
    }

    /// Publishes one batch and commits it once every message is acknowledged.
    fn round(&self, sub: &mut Subscriber) -> Result<u64, String> {
        let batch = sub
            .poll(5_000, Duration::from_millis(200))
            .map_err(|e| e.to_string())?;
        if batch.is_empty() {
            return sub.commit_polled().map(|_| 0).map_err(|e| e.to_string());
        }
        let failed_before = self.deliveries.failed.load(Ordering::Relaxed);
        for d in &batch {
            let event = d.cloud_event(&self.kafka.topic);
            let payload = event.to_json_line();
            let key = d.envelope.task_id.key_string();
            let mut headers = OwnedHeaders::new_with_capacity(3)
                .insert(Header {
                    key: "content-type",
                    value: Some("application/cloudevents+json; charset=UTF-8"),
                })
                .insert(Header {
                    key: "tasker-type",
                    value: Some(event.kind),
                });
            if let Some(ns) = &event.taskernamespace {
                headers = headers.insert(Header {
                    key: "tasker-namespace",
                    value: Some(ns.as_str()),
                });
            }
            let mut record = BaseRecord::to(&self.topic)
                .partition(d.partition.0 as i32)
                .key(key.as_str())
                .payload(payload.as_str())
                .timestamp(d.envelope.at.as_millis() as i64)
                .headers(headers);
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        self.producer.poll(Duration::from_millis(10));
                    }
                    Err((e, _)) => return Err(e.to_string()),
                }
            }
        }
        self.producer
            .flush(Duration::from_secs(60))
            .map_err(|e| e.to_string())?;
        if self.deliveries.failed.load(Ordering::Relaxed) != failed_before {
            return Err("some messages were not delivered".into());
        }
        sub.commit_polled().map_err(|e| e.to_string())?;
        Ok(batch.len() as u64)
    }
}
