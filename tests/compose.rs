//! `docker-compose.yml` is the stack the README's "Run on Kafka and PostgreSQL"
//! configures. There is no Docker engine here to start it, so the file is held
//! to the README's commands and to what the engine expects of its broker.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use serde_yaml_ng::Value;

fn read(file: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file))
        .unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// The value after `NAME=` in the README's Kafka section.
fn readme_setting<'a>(section: &'a str, name: &str) -> &'a str {
    let at = section
        .find(&format!("{name}="))
        .unwrap_or_else(|| panic!("the README's Kafka section sets no {name}"));
    section[at + name.len() + 1..]
        .split_whitespace()
        .next()
        .unwrap()
}

fn env<'a>(service: &'a Value, key: &str) -> &'a Value {
    &service["environment"][key]
}

#[test]
fn compose_runs_kraft_kafka_and_postgres_as_the_readme_configures_them() {
    let compose: Value = serde_yaml_ng::from_str(&read("docker-compose.yml")).unwrap();
    let readme = read("README.md");
    let start = readme
        .find("## Run on Kafka and PostgreSQL")
        .expect("the README's Kafka section");
    let section = &readme[start..];
    assert!(section.contains("docker compose up -d"), "{section}");
    let kafka = &compose["services"]["kafka"];
    let postgres = &compose["services"]["postgres"];

    // Apache Kafka in KRaft mode, one node, healthchecked.
    assert!(
        kafka["image"]
            .as_str()
            .unwrap()
            .starts_with("apache/kafka:"),
        "{kafka:?}"
    );
    let roles = env(kafka, "KAFKA_PROCESS_ROLES").as_str().unwrap();
    assert!(
        roles.contains("broker") && roles.contains("controller"),
        "{roles}"
    );
    for service in [kafka, postgres] {
        assert!(service["healthcheck"]["test"].is_sequence(), "{service:?}");
    }
    // The log is the source of truth: kept forever, and created by the engine
    // with its own partition count (auto-creation would pick the broker's).
    assert_eq!(env(kafka, "KAFKA_LOG_RETENTION_MS").as_i64(), Some(-1));
    assert_eq!(env(kafka, "KAFKA_LOG_RETENTION_BYTES").as_i64(), Some(-1));
    assert_eq!(
        env(kafka, "KAFKA_AUTO_CREATE_TOPICS_ENABLE").as_str(),
        Some("false")
    );

    // The addresses the README exports are the ones compose publishes.
    let brokers = readme_setting(section, "TASKER_KAFKA_BROKERS");
    let advertised = env(kafka, "KAFKA_ADVERTISED_LISTENERS").as_str().unwrap();
    assert_eq!(advertised, format!("PLAINTEXT://{brokers}"));
    let port = brokers.rsplit_once(':').unwrap().1;
    assert!(
        kafka["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|p| p.as_str() == Some(&format!("{port}:{port}"))),
        "{kafka:?}"
    );
    let user = env(postgres, "POSTGRES_USER").as_str().unwrap();
    let password = env(postgres, "POSTGRES_PASSWORD").as_str().unwrap();
    let db = env(postgres, "POSTGRES_DB").as_str().unwrap();
    assert_eq!(
        readme_setting(section, "DATABASE_URL"),
        format!("postgres://{user}:{password}@127.0.0.1:5432/{db}")
    );
    assert!(
        postgres["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|p| p.as_str() == Some("5432:5432")),
        "{postgres:?}"
    );
}
