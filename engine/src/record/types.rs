//! Record kinds and type names: the stable vocabulary of headers, metrics and docs.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Who writes a record: clients write commands, only the engine writes events and
/// control records.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Debug)]
pub enum Kind {
    Command,
    Event,
    Control,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Command => "command",
            Kind::Event => "event",
            Kind::Control => "control",
        }
    }

    /// Stable one-byte code in file-log frames.
    pub fn code(self) -> u8 {
        match self {
            Kind::Command => 1,
            Kind::Event => 2,
            Kind::Control => 3,
        }
    }

    pub fn from_code(code: u8) -> Option<Kind> {
        match code {
            1 => Some(Kind::Command),
            2 => Some(Kind::Event),
            3 => Some(Kind::Control),
            _ => None,
        }
    }
}

impl FromStr for Kind {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "command" => Ok(Kind::Command),
            "event" => Ok(Kind::Event),
            "control" => Ok(Kind::Control),
            other => Err(UnknownName(other.to_owned())),
        }
    }
}

/// A name that is not part of the vocabulary.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown record type or kind `{0}`")]
pub struct UnknownName(pub String);

macro_rules! record_types {
    ($( $variant:ident = $code:literal, $name:literal, $kind:ident, $meaning:literal; )*) => {
        /// Every record type. The dotted name is the `tasker-type` header; the code is the
        /// file-log frame byte. Both are stable forever.
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug)]
        pub enum RecordType {
            $( $variant, )*
        }

        impl RecordType {
            pub const ALL: &'static [RecordType] = &[ $( RecordType::$variant, )* ];

            pub fn name(self) -> &'static str {
                match self { $( RecordType::$variant => $name, )* }
            }

            pub fn code(self) -> u8 {
                match self { $( RecordType::$variant => $code, )* }
            }

            pub fn kind(self) -> Kind {
                match self { $( RecordType::$variant => Kind::$kind, )* }
            }

            /// One sentence on what the record means, for the catalog.
            pub fn meaning(self) -> &'static str {
                match self { $( RecordType::$variant => $meaning, )* }
            }

            pub fn from_code(code: u8) -> Option<RecordType> {
                match code { $( $code => Some(RecordType::$variant), )* _ => None }
            }

            pub fn from_name(name: &str) -> Option<RecordType> {
                match name { $( $name => Some(RecordType::$variant), )* _ => None }
            }
        }
    };
}

record_types! {
    TaskRequested = 1, "task.requested", Command, "A client asks for a task to run a template version with a context.";
    TaskCancelRequested = 2, "task.cancel_requested", Command, "A client asks to cancel a pending or running task.";
    TaskRetryRequested = 3, "task.retry_requested", Command, "A client asks to retry the failed steps of a task in error.";
    StepResolveRequested = 4, "step.resolve_requested", Command, "An operator settles a failed step by hand, optionally with a result.";
    StepResultReported = 5, "step.result_reported", Command, "A remote worker reports the outcome of one attempt of a step.";
    TaskAccepted = 20, "task.accepted", Event, "The request was valid; the task exists, carrying its resolved template.";
    TaskRejected = 21, "task.rejected", Event, "A command was refused (bad bytes, unknown template, invalid context, illegal transition); nothing else changed.";
    TaskStarted = 22, "task.started", Event, "The task moved from pending to in progress.";
    StepStarted = 23, "step.started", Event, "An attempt of a step was handed to its handler.";
    StepCompleted = 24, "step.completed", Event, "An attempt of a step succeeded with a JSON result.";
    StepFailed = 25, "step.failed", Event, "An attempt of a step failed; carries the decided retry time, or none when terminal.";
    StepRetryDue = 26, "step.retry_due", Event, "A failed step is pending again (backoff elapsed, or the task was retried).";
    StepSkipped = 27, "step.skipped", Event, "A pending step will never run because its task finished without it.";
    StepCancelled = 28, "step.cancelled", Event, "A pending or running step was cancelled with its task.";
    StepResolvedManually = 29, "step.resolved_manually", Event, "An operator settled a failed step; its children may run.";
    TaskCompleted = 30, "task.completed", Event, "Every step is complete, skipped or resolved.";
    TaskFailed = 31, "task.failed", Event, "A step failed terminally and nothing else can run.";
    TaskCancelled = 32, "task.cancelled", Event, "The task was cancelled.";
    TaskRetried = 33, "task.retried", Event, "A task in error runs again.";
    TaskResolvedManually = 34, "task.resolved_manually", Event, "A task in error was finished by resolving its failed steps by hand.";
    PartitionClaimed = 60, "partition.claimed", Control, "A writer took ownership of the partition with a higher epoch, fencing older writers.";
}

impl fmt::Display for RecordType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for RecordType {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RecordType::from_name(s).ok_or_else(|| UnknownName(s.to_owned()))
    }
}

/// How a record's payload is encoded (the `content-type` header).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Debug)]
pub enum ContentType {
    /// bincode, the engine's own encoding of an [`Envelope`](super::Envelope).
    Bincode,
    /// A JSON command from any client (see `codec::json`).
    Json,
    /// No or an unrecognized header: sniffed when decoding.
    Unknown,
}

impl ContentType {
    pub const BINCODE_MIME: &'static str = "application/vnd.tasker.bincode";
    pub const JSON_MIME: &'static str = "application/json";

    pub fn mime(self) -> &'static str {
        match self {
            ContentType::Bincode => Self::BINCODE_MIME,
            ContentType::Json => Self::JSON_MIME,
            ContentType::Unknown => "application/octet-stream",
        }
    }

    pub fn from_mime(mime: &str) -> ContentType {
        let base = mime.split(';').next().unwrap_or("").trim();
        if base.eq_ignore_ascii_case(Self::BINCODE_MIME) {
            ContentType::Bincode
        } else if base.eq_ignore_ascii_case(Self::JSON_MIME) {
            ContentType::Json
        } else {
            ContentType::Unknown
        }
    }

    pub fn code(self) -> u8 {
        match self {
            ContentType::Unknown => 0,
            ContentType::Bincode => 1,
            ContentType::Json => 2,
        }
    }

    pub fn from_code(code: u8) -> ContentType {
        match code {
            1 => ContentType::Bincode,
            2 => ContentType::Json,
            _ => ContentType::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_codes_are_unique_and_round_trip() {
        let mut names = std::collections::HashSet::new();
        let mut codes = std::collections::HashSet::new();
        for t in RecordType::ALL {
            assert!(names.insert(t.name()), "duplicate name {}", t.name());
            assert!(codes.insert(t.code()), "duplicate code {}", t.code());
            assert_eq!(RecordType::from_name(t.name()), Some(*t));
            assert_eq!(RecordType::from_code(t.code()), Some(*t));
            let past_tense = t
                .name()
                .split(['.', '_'])
                .any(|w| w.ends_with("ed") || w == "due");
            assert!(past_tense, "{} should be past tense", t.name());
        }
        assert_eq!(RecordType::ALL.len(), 21);
        assert_eq!(RecordType::from_code(0), None);
    }
}
