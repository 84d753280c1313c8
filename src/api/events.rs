//! `/v1/events/catalog`: every record type of the log (name, kind, frame code,
//! meaning), so subscribers know what they can filter on.

use axum::Json;
use serde::{Deserialize, Serialize};
use tasker_engine::record::RecordType;
use utoipa::ToSchema;

use super::problem::Problem;

/// One record type.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CatalogEntry {
    /// The `tasker-type` header, e.g. `step.completed`.
    #[serde(rename = "type")]
    pub name: String,
    /// `command` (written by clients), `event` or `control` (written by the engine).
    pub kind: String,
    /// The stable one-byte code in embedded-log frames.
    pub code: u8,
    pub meaning: String,
}

pub fn catalog() -> Vec<CatalogEntry> {
    RecordType::ALL
        .iter()
        .map(|t| CatalogEntry {
            name: t.name().to_owned(),
            kind: t.kind().as_str().to_owned(),
            code: t.code(),
            meaning: t.meaning().to_owned(),
        })
        .collect()
}

/// The catalog of record types (any authenticated caller).
#[utoipa::path(get, path = "/v1/events/catalog", tag = "events",
    responses((status = 200, body = Vec<CatalogEntry>), (status = 401, body = Problem)))]
pub async fn show() -> Json<Vec<CatalogEntry>> {
    Json(catalog())
}
