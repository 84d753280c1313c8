//! Security checks over the source tree: no SQL is built by formatting values into
//! it (every value is bound), and no credential reaches a log line.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn library_sources() -> Vec<(PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["src", "engine/src", "projections/src"] {
        rust_files(&root.join(dir), &mut files);
    }
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect()
}

#[test]
fn no_sql_is_built_by_formatting() {
    let mut offences = Vec::new();
    for (path, text) in library_sources() {
        // Ignore unit-test modules: they may build database names for scratch DBs.
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        for (i, line) in code.lines().enumerate() {
            let l = line.trim();
            let formats_sql = [
                "SELECT", "INSERT", "UPDATE", "DELETE", "CREATE", "DROP", "TRUNCATE",
            ]
            .iter()
            .any(|kw| {
                l.contains(&format!("format!(\"{kw}")) || l.contains(&format!("format!(r\"{kw}"))
            });
            if formats_sql
                || l.contains("AssertSqlSafe")
                || l.contains("query(&format!")
                || l.contains("query(format!")
                || l.contains("raw_sql(&format!")
            {
                offences.push(format!("{}:{}: {l}", path.display(), i + 1));
            }
        }
    }
    assert!(
        offences.is_empty(),
        "SQL built by formatting (bind values instead):\n{}",
        offences.join("\n")
    );
}

#[test]
fn credentials_are_never_logged() {
    let mut offences = Vec::new();
    for (path, text) in library_sources() {
        for (i, line) in text.lines().enumerate() {
            let l = line.trim();
            let logs = [
                "tracing::",
                "info!(",
                "warn!(",
                "error!(",
                "debug!(",
                "trace!(",
                "eprintln!(",
                "println!(",
            ]
            .iter()
            .any(|m| l.contains(m));
            let secret = ["token", "password", "secret", "authorization"]
                .iter()
                .any(|s| {
                    l.to_ascii_lowercase().contains(&format!("{s} ="))
                        || l.to_ascii_lowercase().contains(&format!("%{s}"))
                        || l.to_ascii_lowercase().contains(&format!("?{s}"))
                });
            if logs && secret {
                offences.push(format!("{}:{}: {l}", path.display(), i + 1));
            }
        }
    }
    assert!(
        offences.is_empty(),
        "a credential may reach a log line:\n{}",
        offences.join("\n")
    );
}
