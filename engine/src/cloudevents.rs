//! Records as CloudEvents 1.0 in structured JSON mode, for subscribers in any
//! language: the Kafka JSON mirror publishes them and `tasker tail --json` prints
//! them. The `data` is the record's JSON form ([`crate::record::record_json`]).

use serde::Serialize;

use crate::record::{Envelope, PartitionId, Position, record_json};

/// One record as a CloudEvent (field order as the spec lists them).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CloudEvent {
    pub specversion: &'static str,
    /// `<partition>-<position>`: unique in the log, so consumers drop duplicates by it.
    pub id: String,
    /// `tasker://<topic>/<partition>`.
    pub source: String,
    /// The dotted record type, e.g. `step.completed`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The task id.
    pub subject: String,
    /// RFC 3339, milliseconds, UTC.
    pub time: String,
    pub datacontenttype: &'static str,
    /// Extension attribute: the task's namespace, when the record's headers carry it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub taskernamespace: Option<String>,
    pub data: serde_json::Value,
}

impl CloudEvent {
    /// The CloudEvent of the record at `position` of `partition` of `topic`.
    pub fn from_record(
        topic: &str,
        partition: PartitionId,
        position: Position,
        env: &Envelope,
        namespace: Option<&str>,
    ) -> CloudEvent {
        CloudEvent {
            specversion: "1.0",
            id: format!("{}-{}", partition.0, position.0),
            source: format!("tasker://{topic}/{}", partition.0),
            kind: env.record_type().name(),
            subject: env.task_id.to_string(),
            time: env.at.to_string(),
            datacontenttype: "application/json",
            taskernamespace: namespace.map(str::to_owned),
            data: record_json(env),
        }
    }

    /// One line of JSON.
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{
        Body, CorrelationId, Epoch, Event, RawJson, StepCompleted, StepId, TaskId, Timestamp,
    };

    #[test]
    fn a_step_event_becomes_a_structured_cloud_event() {
        let task = TaskId::v7(Timestamp(1_718_000_000_123), 9);
        let env = Envelope {
            task_id: task,
            correlation_id: CorrelationId::NIL,
            source_position: None,
            epoch: Epoch(2),
            at: Timestamp(1_718_000_000_123),
            body: Body::Event(Event::StepCompleted(StepCompleted {
                step: StepId(1),
                attempt: 3,
                result: RawJson::parse(r#"{"ok": true}"#).unwrap(),
            })),
        };
        let ce = CloudEvent::from_record("tasker.log", PartitionId(2), Position(41), &env, None);
        let v: serde_json::Value = serde_json::from_str(&ce.to_json_line()).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["id"], "2-41");
        assert_eq!(v["source"], "tasker://tasker.log/2");
        assert_eq!(v["type"], "step.completed");
        assert_eq!(v["subject"], task.to_string());
        assert_eq!(v["time"], "2024-06-10T06:13:20.123Z");
        assert_eq!(v["datacontenttype"], "application/json");
        assert!(v.get("taskernamespace").is_none());
        assert_eq!(v["data"]["step"], 1);
        assert_eq!(v["data"]["attempt"], 3);
        assert_eq!(v["data"]["result"]["ok"], true);
        assert_eq!(v["data"]["epoch"], 2);
        assert!(v["data"].get("source_position").is_none());
    }
}
