//! The Kafka backend: one topic of P partitions through rdkafka (vendored
//! librdkafka). Records carry their task id as the key (the canonical hyphenated
//! string, so Java-compatible `murmur2` partitioning by any client agrees with
//! ours) and the headers `tasker-type`, `tasker-kind`, `tasker-schema`,
//! `content-type` and `tasker-namespace`, so subscribers filter without decoding.
//!
//! Writers share one idempotent, `acks=all` producer (`writer`); several may
//! write one partition (ownership is fenced by epochs in the log, see
//! `runtime`), so positions are the offsets the broker assigns. Readers are
//! assign-mode consumers that never commit, sharing a few clients (`reader`).

mod reader;
mod writer;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use self::reader::Clients;
pub use self::reader::KafkaReader;
pub use self::writer::KafkaWriter;
use self::writer::Producers;
use super::{Log, LogError, LogReader, LogWriter};
use crate::record::{PartitionId, Position};

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
    readers: Arc<Clients>,
    writers: Producers,
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
        let readers = Arc::new(Clients::new(config.clone()));
        let writers = Producers::new(config.clone());
        let log = KafkaLog {
            config,
            meta,
            readers,
            writers,
        };
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

    /// Makes and connects the producer the log's writers share, ahead of the
    /// first append, so that its producer id (idempotence) is asked for as
    /// soon as the broker's connection is up: a new producer's first append
    /// otherwise waits ~500 ms for it. The id still arrives in the background;
    /// a client that times its appends (`tasker bench`) calls this well
    /// before starting the clock.
    pub fn connect_writers(&self, timeout: Duration) -> Result<(), LogError> {
        self.writers.connect(timeout)
    }

    /// Consumer clients the log's live readers hold (each reads a partition
    /// for one reader at a time).
    pub fn reader_clients(&self) -> usize {
        self.readers.len()
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
        Ok(Box::new(self.writers.writer(partition)?))
    }

    fn reader(
        &self,
        partition: PartitionId,
        from: Position,
    ) -> Result<Box<dyn LogReader>, LogError> {
        self.check_partition(partition)?;
        Ok(Box::new(self.readers.reader(partition, from)?))
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

#[cfg(test)]
mod tests {
    use super::KafkaLogConfig;

    #[test]
    fn reader_waits_are_whole_milliseconds_rounded_up() {
        use std::time::Duration;
        assert_eq!(super::reader::whole_millis(Duration::ZERO), Duration::ZERO);
        assert_eq!(
            super::reader::whole_millis(Duration::from_micros(99_001)),
            Duration::from_millis(100)
        );
        assert_eq!(
            super::reader::whole_millis(Duration::from_millis(100)),
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
