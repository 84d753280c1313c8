//! The Kafka backend: one topic of P partitions through rdkafka (vendored
//! librdkafka). Records carry their task id as the key (the canonical hyphenated
//! string, so Java-compatible `murmur2` partitioning by any client agrees with
//! ours) and the headers `tasker-type`, `tasker-kind`, `tasker-schema`,
//! `content-type` and `tasker-namespace`, so subscribers filter without decoding.
//!
//! Writers are idempotent producers with `acks=all`; several may write one
//! partition (ownership is fenced by epochs in the log, see `runtime`), so
//! positions are the offsets the broker assigns. Readers are assign-mode
//! consumers that never commit.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers as _, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::{Headers, Log, LogError, LogReader, LogWriter, Record, StoredRecord};
use crate::record::{ContentType, Kind, PartitionId, Position, RecordType, TaskId, Timestamp};

/// Settings of the Kafka log.
#[derive(Debug, Clone)]
pub struct KafkaLogConfig {
    pub brokers: String,
    pub topic: String,
    pub partitions: u32,
    /// Producer batching.
    pub linger_ms: u64,
    pub batch_size: u64,
    /// Readers' `fetch.wait.max.ms` (see `kafka.fetch_wait_ms`).
    pub fetch_wait_ms: u64,
    /// How long an append may wait for the broker (it stalls through outages).
    pub append_timeout: Duration,
}

impl KafkaLogConfig {
    pub fn new(brokers: &str, topic: &str, partitions: u32) -> Self {
        KafkaLogConfig {
            brokers: brokers.to_owned(),
            topic: topic.to_owned(),
            partitions,
            linger_ms: 5,
            batch_size: 1_000_000,
            fetch_wait_ms: 10,
            append_timeout: Duration::from_secs(300),
        }
    }

    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", "tasker")
            .set("socket.keepalive.enable", "true")
            .set("reconnect.backoff.max.ms", "1000");
        c
    }

    /// An idempotent, `acks=all`, batching producer.
    pub fn producer_config(&self) -> ClientConfig {
        let mut c = self.client();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", self.linger_ms.to_string())
            .set("batch.size", self.batch_size.to_string())
            .set(
                "message.timeout.ms",
                self.append_timeout.as_millis().to_string(),
            )
            .set("queue.buffering.max.messages", "1000000");
        c
    }

    /// A consumer that reads by assignment and never commits.
    pub fn reader_config(&self) -> ClientConfig {
        let mut c = self.client();
        c.set(
            "group.id",
            format!("tasker-reader-{}", uuid::Uuid::now_v7()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", self.fetch_wait_ms.to_string())
        .set("fetch.min.bytes", "1")
        .set("enable.partition.eof", "false");
        c
    }
}

fn kafka_err(e: KafkaError) -> LogError {
    LogError::Kafka(e.to_string())
}

/// Runs a future to completion on a private thread (admin calls are async; this
/// keeps `open` usable from inside and outside any runtime).
fn block_on<F: std::future::Future + Send + 'static>(f: F) -> Result<F::Output, LogError>
where
    F::Output: Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map(|rt| rt.block_on(f))
    })
    .join()
    .map_err(|_| LogError::Kafka("admin thread panicked".into()))?
    .map_err(|e| LogError::Kafka(format!("cannot start a runtime for admin calls: {e}")))
}

/// The log on a Kafka topic.
pub struct KafkaLog {
    config: KafkaLogConfig,
    /// For watermarks and metadata.
    meta: BaseConsumer,
}

impl std::fmt::Debug for KafkaLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaLog")
            .field("config", &self.config)
            .finish()
    }
}

impl KafkaLog {
    /// Connects, and creates the topic with `config.partitions` if it does not
    /// exist; an existing topic with another partition count is an error.
    pub fn open(config: KafkaLogConfig) -> Result<KafkaLog, LogError> {
        let meta: BaseConsumer = config.reader_config().create().map_err(kafka_err)?;
        let log = KafkaLog { config, meta };
        log.ensure_topic()?;
        Ok(log)
    }

    fn partition_count(&self) -> Result<Option<u32>, LogError> {
        let md = self
            .meta
            .fetch_metadata(Some(&self.config.topic), Duration::from_secs(10))
            .map_err(|e| {
                LogError::Kafka(format!(
                    "cannot reach the brokers at {}: {e}",
                    self.config.brokers
                ))
            })?;
        Ok(md
            .topics()
            .iter()
            .find(|t| t.name() == self.config.topic)
            .filter(|t| t.error().is_none() && !t.partitions().is_empty())
            .map(|t| t.partitions().len() as u32))
    }

    fn ensure_topic(&self) -> Result<(), LogError> {
        if let Some(n) = self.partition_count()? {
            return self.check_count(n);
        }
        let admin: AdminClient<DefaultClientContext> =
            self.config.client().create().map_err(kafka_err)?;
        let topic = self.config.topic.clone();
        let partitions = self.config.partitions as i32;
        let results = block_on(async move {
            // The log is the source of truth: keep it forever.
            let new = NewTopic::new(&topic, partitions, TopicReplication::Fixed(1))
                .set("retention.ms", "-1")
                .set("retention.bytes", "-1");
            admin
                .create_topics(
                    [&new],
                    &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
                )
                .await
        })?
        .map_err(kafka_err)?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => {
                    return Err(LogError::Kafka(format!("cannot create topic {t}: {code}")));
                }
            }
        }
        // Metadata can lag topic creation for a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(n) = self.partition_count()? {
                return self.check_count(n);
            }
            if Instant::now() > deadline {
                return Err(LogError::Kafka(format!(
                    "topic {} was created but does not appear in metadata",
                    self.config.topic
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn check_count(&self, n: u32) -> Result<(), LogError> {
        if n == self.config.partitions {
            Ok(())
        } else {
            Err(LogError::Config(format!(
                "topic {} has {n} partitions but log.partitions is {}; use the topic's count or another topic",
                self.config.topic, self.config.partitions
            )))
        }
    }

    pub fn config(&self) -> &KafkaLogConfig {
        &self.config
    }

    fn check_partition(&self, p: PartitionId) -> Result<(), LogError> {
        if p.0 < self.config.partitions {
            Ok(())
        } else {
            Err(LogError::NoSuchPartition {
                partition: p,
                partitions: self.config.partitions,
            })
        }
    }

    fn watermarks(&self, p: PartitionId) -> Result<(i64, i64), LogError> {
        self.check_partition(p)?;
        self.meta
            .fetch_watermarks(&self.config.topic, p.0 as i32, Duration::from_secs(10))
            .map_err(kafka_err)
    }
}

impl Log for KafkaLog {
    fn partitions(&self) -> u32 {
        self.config.partitions
    }

    fn shared_writers(&self) -> bool {
        true
    }

    fn writer(&self, partition: PartitionId) -> Result<Box<dyn LogWriter>, LogError> {
        self.check_partition(partition)?;
        Ok(Box::new(KafkaWriter::new(&self.config, partition)?))
    }

    fn reader(
        &self,
        partition: PartitionId,
        from: Position,
    ) -> Result<Box<dyn LogReader>, LogError> {
        self.check_partition(partition)?;
        Ok(Box::new(KafkaReader::new(&self.config, partition, from)?))
    }

    fn end(&self, partition: PartitionId) -> Result<Position, LogError> {
        Ok(Position(self.watermarks(partition)?.1.max(0) as u64))
    }

    fn start(&self, partition: PartitionId) -> Result<Position, LogError> {
        Ok(Position(self.watermarks(partition)?.0.max(0) as u64))
    }

    fn describe(&self) -> String {
        format!(
            "Kafka topic {} at {} ({} partitions)",
            self.config.topic, self.config.brokers, self.config.partitions
        )
    }
}

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
    fn new(config: &KafkaLogConfig, partition: PartitionId) -> Result<KafkaWriter, LogError> {
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

/// An assign-mode consumer of one partition.
pub struct KafkaReader {
    consumer: BaseConsumer,
    topic: String,
    partition: PartitionId,
    next: Position,
}

impl std::fmt::Debug for KafkaReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaReader")
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .field("next", &self.next)
            .finish()
    }
}

impl KafkaReader {
    fn new(
        config: &KafkaLogConfig,
        partition: PartitionId,
        from: Position,
    ) -> Result<KafkaReader, LogError> {
        let consumer: BaseConsumer = config.reader_config().create().map_err(kafka_err)?;
        let mut r = KafkaReader {
            consumer,
            topic: config.topic.clone(),
            partition,
            next: from,
        };
        r.assign(from)?;
        Ok(r)
    }

    fn assign(&mut self, from: Position) -> Result<(), LogError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(
            &self.topic,
            self.partition.0 as i32,
            Offset::Offset(from.0 as i64),
        )
        .map_err(kafka_err)?;
        self.consumer.assign(&tpl).map_err(kafka_err)?;
        self.next = from;
        Ok(())
    }
}

/// A wait rounded up to whole milliseconds. rdkafka hands librdkafka its
/// timeout truncated to milliseconds and, when that wait ends short of the
/// deadline, polls without waiting until it passes: a busy loop of up to a
/// millisecond at the end of every idle wait, ~1 % of a core per reader.
fn whole_millis(wait: Duration) -> Duration {
    Duration::from_millis(wait.as_micros().div_ceil(1000) as u64)
}

/// Our headers back from Kafka's (missing or unknown ones stay unknown; of a
/// repeated one, the last counts). One pass, no map: this runs per record.
fn parse_headers(m: &rdkafka::message::BorrowedMessage<'_>) -> Headers {
    let mut h = Headers::unknown();
    let Some(headers) = m.headers() else { return h };
    for header in headers.iter() {
        let Some(value) = header.value else { continue };
        let text = || std::str::from_utf8(value).ok();
        match header.key {
            "content-type" => {
                if let Some(ct) = text() {
                    h.content_type = ContentType::from_mime(ct);
                }
            }
            "tasker-type" => h.record_type = text().and_then(RecordType::from_name),
            "tasker-kind" => h.kind = text().and_then(|k| k.parse::<Kind>().ok()),
            "tasker-schema" => h.schema = text().and_then(|s| s.parse().ok()).unwrap_or(0),
            "tasker-namespace" => h.namespace = Some(Bytes::copy_from_slice(value)),
            _ => {}
        }
    }
    h
}

fn stored(m: &rdkafka::message::BorrowedMessage<'_>) -> StoredRecord {
    let key = m
        .key()
        .and_then(|k| std::str::from_utf8(k).ok())
        .and_then(|k| k.parse::<TaskId>().ok())
        .unwrap_or(TaskId::NIL);
    StoredRecord {
        position: Position(m.offset().max(0) as u64),
        record: Record {
            key,
            headers: parse_headers(m),
            timestamp: Timestamp::from_millis(m.timestamp().to_millis().unwrap_or(0).max(0) as u64),
            payload: Bytes::copy_from_slice(m.payload().unwrap_or(&[])),
        },
    }
}

impl LogReader for KafkaReader {
    fn partition(&self) -> PartitionId {
        self.partition
    }

    fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<StoredRecord>, LogError> {
        let mut out = Vec::new();
        let deadline = Instant::now() + wait;
        while out.len() < max {
            let timeout = if out.is_empty() {
                whole_millis(deadline.saturating_duration_since(Instant::now()))
            } else {
                Duration::ZERO
            };
            match self.consumer.poll(timeout) {
                None => break,
                Some(Ok(m)) => {
                    if m.offset() < self.next.0 as i64 {
                        continue;
                    }
                    let rec = stored(&m);
                    self.next = rec.position.next();
                    out.push(rec);
                }
                // Transient broker trouble: librdkafka reconnects by itself.
                Some(Err(e)) => {
                    tracing::debug!(partition = %self.partition, error = %e, "kafka read error");
                    if out.is_empty() && Instant::now() >= deadline {
                        break;
                    }
                }
            }
            if out.is_empty() && Instant::now() >= deadline {
                break;
            }
        }
        Ok(out)
    }

    fn seek(&mut self, to: Position) -> Result<(), LogError> {
        self.assign(to)
    }

    fn position(&self) -> Position {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::KafkaLogConfig;

    #[test]
    fn reader_waits_are_whole_milliseconds_rounded_up() {
        use std::time::Duration;
        assert_eq!(super::whole_millis(Duration::ZERO), Duration::ZERO);
        assert_eq!(
            super::whole_millis(Duration::from_micros(99_001)),
            Duration::from_millis(100)
        );
        assert_eq!(
            super::whole_millis(Duration::from_millis(100)),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn producer_and_reader_settings_come_from_the_config() {
        let mut c = KafkaLogConfig::new("127.0.0.1:9092", "t", 3);
        assert_eq!(c.reader_config().get("fetch.wait.max.ms"), Some("10"));
        c.fetch_wait_ms = 250;
        c.linger_ms = 2;
        assert_eq!(c.reader_config().get("fetch.wait.max.ms"), Some("250"));
        let producer = c.producer_config();
        assert_eq!(producer.get("linger.ms"), Some("2"));
        assert_eq!(producer.get("enable.idempotence"), Some("true"));
        assert_eq!(producer.get("acks"), Some("all"));
    }
}
