//! The log conformance suite against a live Kafka-protocol broker
//! (`TASKER_KAFKA_BROKERS`; `scripts/test` starts one), plus Kafka specifics.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::sync::Arc;
use std::time::Duration;

use tasker_engine::log::conformance::{Harness, TestLog, sample};
use tasker_engine::log::kafka::{KafkaLog, KafkaLogConfig};
use tasker_engine::log::{Log, LogError};
use tasker_engine::record::{PartitionId, Position};

pub fn brokers() -> String {
    std::env::var("TASKER_KAFKA_BROKERS").unwrap_or_else(|_| {
        panic!(
            "TASKER_KAFKA_BROKERS is not set. These tests need a Kafka-protocol broker: run \
             scripts/test (it installs and starts Nisshi), or start one and export \
             TASKER_KAFKA_BROKERS=127.0.0.1:9092"
        )
    })
}

fn topic() -> String {
    format!("tasker-test-{}", uuid::Uuid::now_v7().simple())
}

struct KafkaTestLog {
    config: KafkaLogConfig,
    log: Option<Arc<dyn Log>>,
}

impl TestLog for KafkaTestLog {
    fn log(&self) -> Arc<dyn Log> {
        Arc::clone(self.log.as_ref().expect("open"))
    }
    fn reopen(&mut self) -> Result<(), LogError> {
        self.log = None;
        self.log = Some(Arc::new(KafkaLog::open(self.config.clone())?));
        Ok(())
    }
}

struct KafkaHarness;

impl Harness for KafkaHarness {
    fn fresh(&self, partitions: u32) -> Result<Box<dyn TestLog>, LogError> {
        let mut config = KafkaLogConfig::new(&brokers(), &topic(), partitions);
        config.linger_ms = 1;
        let log: Arc<dyn Log> = Arc::new(KafkaLog::open(config.clone())?);
        Ok(Box::new(KafkaTestLog {
            config,
            log: Some(log),
        }))
    }
}

tasker_engine::conformance_tests!(KafkaHarness);

#[test]
fn an_existing_topic_with_another_partition_count_is_refused() {
    let t = topic();
    drop(KafkaLog::open(KafkaLogConfig::new(&brokers(), &t, 3)).unwrap());
    let err = KafkaLog::open(KafkaLogConfig::new(&brokers(), &t, 5)).unwrap_err();
    assert!(
        err.to_string()
            .contains("has 3 partitions but log.partitions is 5"),
        "{err}"
    );
    assert_eq!(
        KafkaLog::open(KafkaLogConfig::new(&brokers(), &t, 3))
            .unwrap()
            .partitions(),
        3
    );
}

#[test]
fn two_writers_on_one_partition_interleave_without_loss() {
    // Kafka allows several writers per partition (fencing is the engine's job):
    // every append gets distinct positions and everything reads back.
    let log = KafkaLog::open(KafkaLogConfig::new(&brokers(), &topic(), 1)).unwrap();
    let p = PartitionId(0);
    let mut a = log.writer(p).unwrap();
    let mut b = log.writer(p).unwrap();
    let mut positions = Vec::new();
    for i in 0..20 {
        positions.extend(a.append(&[sample(i)]).unwrap());
        positions.extend(b.append(&[sample(100 + i)]).unwrap());
    }
    positions.sort();
    positions.dedup();
    assert_eq!(positions.len(), 40);
    let mut r = log.reader(p, Position(0)).unwrap();
    let mut got = Vec::new();
    while got.len() < 40 {
        let batch = r.poll(100, Duration::from_secs(5)).unwrap();
        assert!(!batch.is_empty(), "records missing after {}", got.len());
        got.extend(batch);
    }
    assert_eq!(got.len(), 40);
}

#[test]
fn readers_share_consumer_clients_one_partition_each() {
    // A processor and a projector per partition: two clients, not one per reader.
    let log = KafkaLog::open(KafkaLogConfig::new(&brokers(), &topic(), 3)).unwrap();
    let mut w = log.writer(PartitionId(1)).unwrap();
    w.append(&[sample(7)]).unwrap();
    let open = |p| log.reader(PartitionId(p), Position(0)).unwrap();
    let first: Vec<_> = (0..3).map(open).collect();
    assert_eq!(log.reader_clients(), 1);
    let mut second: Vec<_> = (0..3).map(open).collect();
    assert_eq!(log.reader_clients(), 2);
    // Each reads its own partition from its own client.
    let got = second[1].poll(10, Duration::from_secs(10)).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].record.payload, sample(7).payload);
    assert!(
        second[0]
            .poll(10, Duration::from_millis(50))
            .unwrap()
            .is_empty()
    );
    // A client closes with its last reader; a partition's slot is reused.
    drop(second);
    assert_eq!(log.reader_clients(), 1);
    drop(first);
    assert_eq!(log.reader_clients(), 0);
    let mut again = open(1);
    assert_eq!(log.reader_clients(), 1);
    let got = again.poll(10, Duration::from_secs(10)).unwrap();
    assert_eq!(
        got.len(),
        1,
        "a reader on a fresh client reads from its start"
    );
}
