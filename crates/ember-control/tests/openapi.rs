//! The checked-in OpenAPI document must match what the code generates.

use std::path::PathBuf;

fn checked_in() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("openapi.json")
}

#[test]
fn checked_in_openapi_document_matches_the_code() {
    let fresh = ember_control::openapi::document_json();
    let path = checked_in();
    if std::env::var("EMBER_UPDATE_OPENAPI").as_deref() == Ok("1") {
        std::fs::write(&path, &fresh).expect("write openapi.json");
        eprintln!("rewrote {}", path.display());
        return;
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    if current == fresh {
        return;
    }
    let (line, old, new) = current
        .lines()
        .zip(fresh.lines())
        .enumerate()
        .find(|(_, (a, b))| a != b)
        .map(|(i, (a, b))| (i + 1, a.to_owned(), b.to_owned()))
        .unwrap_or_else(|| {
            let n = current.lines().count().min(fresh.lines().count()) + 1;
            (n, "<end of file>".into(), "<more lines>".into())
        });
    panic!(
        "{} is out of date with the code (first difference at line {line}):\n  checked in: {old}\n  generated:  {new}\n\
         If the API change is intended, regenerate it:\n  EMBER_UPDATE_OPENAPI=1 cargo nextest run -p ember-control --test openapi\n\
         and commit the file.",
        path.display()
    );
}

#[test]
fn the_document_covers_the_v1_surface() {
    let doc: serde_json::Value =
        serde_json::from_str(&ember_control::openapi::document_json()).unwrap();
    let paths = doc["paths"].as_object().expect("paths");
    for (path, methods) in [
        ("/v1/sandboxes", &["get", "post"][..]),
        ("/v1/sandboxes/{id}", &["get", "delete"]),
        ("/v1/sandboxes/{id}/pause", &["post"]),
        ("/v1/sandboxes/{id}/resume", &["post"]),
        ("/v1/sandboxes/{id}/timeout", &["post"]),
        ("/v1/sandboxes/{id}/snapshots", &["post"]),
        ("/v1/sandboxes/{id}/exec", &["post"]),
        ("/v1/sandboxes/{id}/processes", &["get"]),
        ("/v1/sandboxes/{id}/processes/{pid}/stdin", &["post"]),
        ("/v1/sandboxes/{id}/processes/{pid}/signal", &["post"]),
        ("/v1/sandboxes/{id}/processes/{pid}/events", &["get"]),
        ("/v1/sandboxes/{id}/files", &["get", "put", "delete"]),
        ("/v1/sandboxes/{id}/files/stat", &["get"]),
        ("/v1/sandboxes/{id}/files/list", &["get"]),
        ("/v1/sandboxes/{id}/files/mkdir", &["post"]),
        ("/v1/snapshots", &["get"]),
        ("/v1/snapshots/{name}", &["get", "delete"]),
        ("/v1/keys", &["get", "post"]),
        ("/v1/keys/{id}", &["delete"]),
        ("/v1/teams", &["get", "post"]),
        ("/v1/hosts", &["get"]),
        ("/v1/audit", &["get"]),
        ("/internal/v1/hosts", &["post"]),
        ("/healthz", &["get"]),
        ("/metrics", &["get"]),
    ] {
        let item = paths
            .get(path)
            .unwrap_or_else(|| panic!("{path} missing from the document"));
        for m in methods {
            assert!(item.get(*m).is_some(), "{m} {path} missing");
        }
    }
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    for s in [
        "CreateSandboxRequest",
        "Sandbox",
        "ErrorBody",
        "ExecEvent",
        "Snapshot",
        "CreatedKey",
    ] {
        assert!(schemas.contains_key(s), "schema {s} missing");
    }
    // Requests reject unknown fields, and the document says so.
    assert_eq!(
        schemas["CreateSandboxRequest"]["additionalProperties"],
        serde_json::json!(false)
    );
}
