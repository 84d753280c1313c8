//! Writers: the writers of one log share an idempotent, `acks=all` producer
//! (one client batching every partition's records into one request per
//! broker), whose delivery reports a poll thread hands back to the append
//! waiting for them. A producer that fails fatally (idempotence lost) is
//! replaced for the writers made after, which the engine makes when it
//! restarts a partition.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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

/// The producer of a log's writers, made when the first writer is.
#[derive(Debug)]
pub(super) struct Producers {
    config: KafkaLogConfig,
    current: Mutex<Option<Arc<Shared>>>,
}

impl Producers {
    pub(super) fn new(config: KafkaLogConfig) -> Producers {
        Producers {
            config,
            current: Mutex::new(None),
        }
    }

    /// The shared producer, or a new one if there is none yet or it failed
    /// fatally.
    fn get(&self) -> Result<Arc<Shared>, LogError> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(shared) = current.as_ref()
            && shared.producer.client().fatal_error().is_none()
        {
            return Ok(Arc::clone(shared));
        }
        let producer: Arc<BaseProducer<DeliveryContext>> = Arc::new(
            self.config
                .producer_config()
                .create_with_context(DeliveryContext)
                .map_err(kafka_err)?,
        );
        let poller = Poller::start(Arc::clone(&producer))?;
        let shared = Arc::new(Shared {
            producer,
            _poller: poller,
        });
        *current = Some(Arc::clone(&shared));
        Ok(shared)
    }

    /// Makes the shared producer and waits until it knows the topic's
    /// partition leaders, so the first append does not pay for connecting.
    ///
    /// Twice: librdkafka asks for the producer id (idempotence) when a
    /// metadata response arrives, but the first one comes over the bootstrap
    /// connection and names the broker under its own id, whose connection is
    /// not up yet, so the ask waits for a 500 ms timer. The second response
    /// comes when that connection is up and the ask goes out at once (first
    /// append after a new producer: ~590 ms with one fetch, 60–100 ms with two).
    pub(super) fn connect(&self, timeout: Duration) -> Result<(), LogError> {
        let shared = self.get()?;
        for _ in 0..2 {
            shared
                .producer
                .client()
                .fetch_metadata(Some(&self.config.topic), timeout)
                .map_err(kafka_err)?;
        }
        Ok(())
    }

    /// Makes a writer of `partition`.
    pub(super) fn writer(&self, partition: PartitionId) -> Result<KafkaWriter, LogError> {
        Ok(KafkaWriter {
            shared: self.get()?,
            topic: self.config.topic.clone(),
            partition,
            timeout: self.config.append_timeout + Duration::from_secs(5),
            reports: crossbeam_channel::unbounded(),
        })
    }
}

/// A producer and its poll thread.
struct Shared {
    producer: Arc<BaseProducer<DeliveryContext>>,
    _poller: Poller,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Drop for Shared {
    /// The log and its last writer on this producer are gone: what an
    /// abandoned append left queued gets a last chance to go out.
    fn drop(&mut self) {
        let _ = self.producer.flush(Duration::from_secs(5));
    }
}

/// A writer of one partition on the log's shared producer. Its appends wait
/// for their own delivery reports only.
pub struct KafkaWriter {
    shared: Arc<Shared>,
    topic: String,
    partition: PartitionId,
    timeout: Duration,
    reports: (Sender<Delivery>, Receiver<Delivery>),
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
    fn start(producer: Arc<BaseProducer<DeliveryContext>>) -> Result<Poller, LogError> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("tasker-kpoll".into())
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
                match self.shared.producer.send(record) {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::log::conformance::sample;

    /// librdkafka's hook for tests: the fatal state an idempotent producer
    /// reaches when the broker loses track of its sequence numbers.
    #[allow(unsafe_code)]
    fn make_fatal(p: &BaseProducer<DeliveryContext>) {
        let reason = std::ffi::CString::new("test").unwrap();
        // SAFETY: a live client handle and a NUL-terminated string that
        // outlives the call.
        unsafe {
            rdkafka::bindings::rd_kafka_test_fatal_error(
                p.client().native_ptr(),
                rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
                reason.as_ptr(),
            );
        }
    }

    #[test]
    fn writers_share_a_producer_until_it_fails_fatally() {
        // No broker is needed: a producer connects when it first sends.
        let producers = Producers::new(KafkaLogConfig::new("127.0.0.1:1", "t", 2));
        let mut a = producers.writer(PartitionId(0)).unwrap();
        let b = producers.writer(PartitionId(1)).unwrap();
        assert!(Arc::ptr_eq(&a.shared, &b.shared), "one producer per log");
        make_fatal(&a.shared.producer);
        let err = a.append(&[sample(1)]).unwrap_err();
        assert!(err.to_string().contains("atal"), "{err}");
        let c = producers.writer(PartitionId(0)).unwrap();
        assert!(
            !Arc::ptr_eq(&a.shared, &c.shared),
            "a failed producer is replaced"
        );
        assert!(c.shared.producer.client().fatal_error().is_none());
    }
}
