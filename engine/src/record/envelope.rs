//! The envelope every record shares.

use serde::{Deserialize, Serialize};

use super::command::Command;
use super::event::{Control, Event};
use super::ids::{CorrelationId, Epoch, Position, TaskId, Timestamp};
use super::types::{Kind, RecordType};

/// The current envelope/body version written by this build. Decoders accept every
/// version ever written.
pub const SCHEMA_VERSION: u16 = 1;

/// One record of the log.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct Envelope {
    pub task_id: TaskId,
    pub correlation_id: CorrelationId,
    /// Events only: the position of the command this event answers, if any.
    pub source_position: Option<Position>,
    /// Events and control records: the writer's ownership epoch (0 for commands).
    pub epoch: Epoch,
    /// Stamped once by the writer; the only clock the fold ever reads.
    pub at: Timestamp,
    pub body: Body,
}

/// What the record says.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub enum Body {
    Command(Command),
    Event(Event),
    Control(Control),
}

impl Body {
    pub fn kind(&self) -> Kind {
        match self {
            Body::Command(_) => Kind::Command,
            Body::Event(_) => Kind::Event,
            Body::Control(_) => Kind::Control,
        }
    }

    pub fn record_type(&self) -> RecordType {
        match self {
            Body::Command(c) => c.record_type(),
            Body::Event(e) => e.record_type(),
            Body::Control(c) => c.record_type(),
        }
    }
}

impl Envelope {
    /// A client's command, not yet positioned.
    pub fn command(
        task_id: TaskId,
        correlation_id: CorrelationId,
        at: Timestamp,
        command: Command,
    ) -> Self {
        Envelope {
            task_id,
            correlation_id,
            source_position: None,
            epoch: Epoch(0),
            at,
            body: Body::Command(command),
        }
    }

    pub fn kind(&self) -> Kind {
        self.body.kind()
    }

    pub fn record_type(&self) -> RecordType {
        self.body.record_type()
    }

    pub fn as_event(&self) -> Option<&Event> {
        match &self.body {
            Body::Event(e) => Some(e),
            Body::Command(_) | Body::Control(_) => None,
        }
    }

    pub fn as_command(&self) -> Option<&Command> {
        match &self.body {
            Body::Command(c) => Some(c),
            Body::Event(_) | Body::Control(_) => None,
        }
    }
}
