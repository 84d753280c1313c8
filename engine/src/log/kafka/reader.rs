//! Readers: assign-mode consumers that never commit. The readers of one log
//! share consumer clients: a client fetches for every partition it serves (one
//! request per broker, not one per reader) and hands each partition's records
//! to its reader through that partition's own queue. A client serves a
//! partition to one reader at a time (and never twice, see `Client`), so a
//! process whose processors and
//! projectors read the same P partitions holds two clients instead of 2P, each
//! with its own connections and threads.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, Consumer, DefaultConsumerContext};
use rdkafka::message::{Headers as _, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::{KafkaLogConfig, kafka_err};
use crate::log::{Headers, LogError, LogReader, Record, StoredRecord};
use crate::record::{ContentType, Kind, PartitionId, Position, RecordType, TaskId, Timestamp};

/// The consumer clients of a log's readers.
#[derive(Debug)]
pub(super) struct Clients {
    config: KafkaLogConfig,
    pool: Mutex<Vec<Client>>,
}

/// One consumer client: the partitions its live readers read, and every
/// partition it was ever given. A client is never given a partition twice:
/// librdkafka stalled a partition assigned again right after it was
/// unassigned (seen with a seek done that way), so a later reader of that
/// partition, or a seek, takes another client.
struct Client {
    consumer: Arc<BaseConsumer>,
    live: BTreeSet<i32>,
    served: BTreeSet<i32>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("live", &self.live)
            .field("served", &self.served)
            .finish()
    }
}

impl Clients {
    pub(super) fn new(config: KafkaLogConfig) -> Clients {
        Clients {
            config,
            pool: Mutex::new(Vec::new()),
        }
    }

    fn pool(&self) -> MutexGuard<'_, Vec<Client>> {
        // The pool is a list of sets; a panic elsewhere cannot leave it torn.
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A reader of `partition` from `from`, on the first client that has not
    /// been given that partition (a new client if every one has).
    pub(super) fn reader(
        self: &Arc<Self>,
        partition: PartitionId,
        from: Position,
    ) -> Result<KafkaReader, LogError> {
        let p = partition.0 as i32;
        let consumer = {
            let mut pool = self.pool();
            match pool.iter_mut().find(|c| !c.served.contains(&p)) {
                Some(client) => {
                    client.live.insert(p);
                    client.served.insert(p);
                    Arc::clone(&client.consumer)
                }
                None => {
                    let consumer: Arc<BaseConsumer> =
                        Arc::new(self.config.reader_config().create().map_err(kafka_err)?);
                    pool.push(Client {
                        consumer: Arc::clone(&consumer),
                        live: BTreeSet::from([p]),
                        served: BTreeSet::from([p]),
                    });
                    consumer
                }
            }
        };
        // Split before assigning, so no record of this partition ever lands in
        // the client's main queue (which any reader drains of events).
        let Some(queue) = consumer.split_partition_queue(&self.config.topic, p) else {
            self.release(&consumer, p);
            return Err(LogError::Kafka(format!(
                "cannot make a queue for partition {partition} of {}",
                self.config.topic
            )));
        };
        let reader = KafkaReader {
            clients: Arc::clone(self),
            queue,
            consumer,
            partition,
            next: from,
        };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.config.topic, p, Offset::Offset(from.0 as i64))
            .map_err(kafka_err)?;
        reader
            .consumer
            .incremental_assign(&tpl)
            .map_err(kafka_err)?;
        Ok(reader)
    }

    /// The reader of `partition` on `consumer` is gone; a client closes with
    /// its last reader.
    fn release(&self, consumer: &Arc<BaseConsumer>, partition: i32) {
        let mut pool = self.pool();
        if let Some(i) = pool.iter().position(|c| Arc::ptr_eq(&c.consumer, consumer)) {
            pool[i].live.remove(&partition);
            if pool[i].live.is_empty() {
                pool.swap_remove(i);
            }
        }
    }

    pub(super) fn len(&self) -> usize {
        self.pool().len()
    }
}

/// A reader of one partition, on a client it may share with readers of other
/// partitions.
pub struct KafkaReader {
    clients: Arc<Clients>,
    // Declared before `consumer`: the queue goes first.
    queue: PartitionQueue<DefaultConsumerContext>,
    consumer: Arc<BaseConsumer>,
    partition: PartitionId,
    next: Position,
}

impl std::fmt::Debug for KafkaReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaReader")
            .field("topic", &self.clients.config.topic)
            .field("partition", &self.partition)
            .field("next", &self.next)
            .finish()
    }
}

impl KafkaReader {
    /// Serves the client's own events (errors, mostly), which librdkafka
    /// queues apart from any partition's records; whichever reader polls
    /// first takes them.
    fn serve_events(&self) {
        for _ in 0..64 {
            match self.consumer.poll(Duration::ZERO) {
                None => return,
                Some(Err(e)) => {
                    tracing::debug!(partition = %self.partition, error = %e, "kafka client event");
                }
                // Every partition is split before it is assigned (and librdkafka
                // keeps a split queue split across assignments), so no record
                // comes here.
                Some(Ok(m)) => {
                    tracing::warn!(
                        partition = m.partition(),
                        offset = m.offset(),
                        "kafka record on the client's main queue"
                    );
                }
            }
        }
    }
}

impl Drop for KafkaReader {
    fn drop(&mut self) {
        // Stops the fetch; the client may go on serving other partitions.
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.clients.config.topic, self.partition.0 as i32);
        let _ = self.consumer.incremental_unassign(&tpl);
        self.clients
            .release(&self.consumer, self.partition.0 as i32);
    }
}

/// A wait rounded up to whole milliseconds. rdkafka hands librdkafka its
/// timeout truncated to milliseconds and, when that wait ends short of the
/// deadline, polls without waiting until it passes: a busy loop of up to a
/// millisecond at the end of every idle wait, ~1 % of a core per reader.
pub(super) fn whole_millis(wait: Duration) -> Duration {
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
        self.serve_events();
        let mut out = Vec::new();
        let deadline = Instant::now() + wait;
        while out.len() < max {
            let timeout = if out.is_empty() {
                whole_millis(deadline.saturating_duration_since(Instant::now()))
            } else {
                Duration::ZERO
            };
            match self.queue.poll(timeout) {
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

    /// A fresh reader from `to`, on another client (see `Client`); this one
    /// closes. Only audits seek, and rarely.
    fn seek(&mut self, to: Position) -> Result<(), LogError> {
        *self = self.clients.reader(self.partition, to)?;
        Ok(())
    }

    fn position(&self) -> Position {
        self.next
    }
}
