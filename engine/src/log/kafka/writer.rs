//! Writers: one idempotent, `acks=all` producer per partition writer, whose
//! delivery reports a poll thread hands back to the waiting append.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};

use super::{KafkaLogConfig, kafka_err};
use crate::log::{Headers, LogError, LogWriter, Record};
use crate::record::{PartitionId, Position};

type Delivery = (usize, Result<i64, String>);

/// Sends each delivery report back to the append that is waiting for it.
struct DeliveryContext;

impl ClientContext for DeliveryContext {}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Box<(usize, Sender<Delivery>)>;

    fn delivery(
        &self,
        result: &rdkafka::message::DeliveryResult<'_>,
        opaque: Self::DeliveryOpaque,
    ) {
        let (index, tx) = *opaque;
        let outcome = match result {
            Ok(m) => Ok(m.offset()),
            Err((e, _)) => Err(e.to_string()),
        };
        let _ = tx.send((index, outcome));
    }
}

/// An idempotent producer for one partition.
pub struct KafkaWriter {
    producer: Arc<BaseProducer<DeliveryContext>>,
    topic: String,
    partition: PartitionId,
    timeout: Duration,
    reports: (Sender<Delivery>, Receiver<Delivery>),
    _poller: Poller,
}

/// How long one `poll` of the producer's thread lasts. rdkafka's `poll` runs
/// until its deadline and, once less than a millisecond is left, polls without
/// waiting: the last millisecond of every window is a busy loop. Polling from
/// the appending thread in 5 ms windows spent ~16 % of a processor thread's
/// time there and rounded every append up to a multiple of 5 ms.
const POLL_WINDOW: Duration = Duration::from_millis(500);

/// The thread that serves a producer's delivery reports as they arrive, so an
/// append waits on its channel instead of polling.
struct Poller {
    stop: Arc<AtomicBool>,
}

impl Poller {
    fn start(
        producer: Arc<BaseProducer<DeliveryContext>>,
        partition: PartitionId,
    ) -> Result<Poller, LogError> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        std::thread::Builder::new()
            .name(format!("tasker-kp{}", partition.0))
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    producer.poll(POLL_WINDOW);
                }
            })
            .map_err(|e| LogError::Kafka(format!("start the producer's poll thread: {e}")))?;
        Ok(Poller { stop })
    }
}

impl Drop for Poller {
    /// The thread ends within a window and drops the producer last; nothing
    /// waits for it.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for KafkaWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaWriter")
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .finish()
    }
}

impl KafkaWriter {
    pub(super) fn new(
        config: &KafkaLogConfig,
        partition: PartitionId,
    ) -> Result<KafkaWriter, LogError> {
        let producer: Arc<BaseProducer<DeliveryContext>> = Arc::new(
            config
                .producer_config()
                .create_with_context(DeliveryContext)
                .map_err(kafka_err)?,
        );
        let poller = Poller::start(Arc::clone(&producer), partition)?;
        Ok(KafkaWriter {
            producer,
            topic: config.topic.clone(),
            partition,
            timeout: config.append_timeout + Duration::from_secs(5),
            reports: crossbeam_channel::unbounded(),
            _poller: poller,
        })
    }
}

/// The Kafka headers of a record.
fn kafka_headers(h: &Headers) -> OwnedHeaders {
    let schema = h.schema.to_string();
    let mut out = OwnedHeaders::new_with_capacity(5).insert(Header {
        key: "content-type",
        value: Some(h.content_type.mime()),
    });
    if let Some(t) = h.record_type {
        out = out.insert(Header {
            key: "tasker-type",
            value: Some(t.name()),
        });
    }
    if let Some(k) = h.kind {
        out = out.insert(Header {
            key: "tasker-kind",
            value: Some(k.as_str()),
        });
    }
    if h.schema > 0 {
        out = out.insert(Header {
            key: "tasker-schema",
            value: Some(schema.as_str()),
        });
    }
    if let Some(ns) = &h.namespace {
        out = out.insert(Header {
            key: "tasker-namespace",
            value: Some(&ns[..]),
        });
    }
    out
}

impl LogWriter for KafkaWriter {
    fn partition(&self) -> PartitionId {
        self.partition
    }

    fn append(&mut self, batch: &[Record]) -> Result<Vec<Position>, LogError> {
        let (tx, rx) = &self.reports;
        while rx.try_recv().is_ok() {} // reports of an abandoned earlier append
        let keys: Vec<String> = batch.iter().map(|r| r.key.key_string()).collect();
        for (i, r) in batch.iter().enumerate() {
            let mut record = BaseRecord::with_opaque_to(&self.topic, Box::new((i, tx.clone())))
                .partition(self.partition.0 as i32)
                .key(keys[i].as_str())
                .payload(&r.payload[..])
                .timestamp(r.timestamp.as_millis() as i64)
                .headers(kafka_headers(&r.headers));
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        // The poll thread frees the queue as deliveries come back.
                        record = back;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err((e, _)) => return Err(kafka_err(e)),
                }
            }
        }
        let mut positions = vec![None; batch.len()];
        let mut left = batch.len();
        let deadline = Instant::now() + self.timeout;
        while left > 0 {
            let report = rx.recv_deadline(deadline).map_err(|_| {
                LogError::Kafka(format!(
                    "append to partition {}: no acknowledgement within {:?}",
                    self.partition, self.timeout
                ))
            })?;
            match report {
                (i, Ok(offset)) if i < positions.len() && positions[i].is_none() => {
                    positions[i] = Some(Position(offset.max(0) as u64));
                    left -= 1;
                }
                (_, Ok(_)) => {}
                (_, Err(e)) => {
                    return Err(LogError::Kafka(format!(
                        "append to partition {}: {e}",
                        self.partition
                    )));
                }
            }
        }
        Ok(positions.into_iter().flatten().collect())
    }
}

impl Drop for KafkaWriter {
    fn drop(&mut self) {
        let _ = self.producer.flush(Duration::from_secs(5));
    }
}
