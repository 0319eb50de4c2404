//! `docs/api.md` is generated from the checked-in OpenAPI document
//! (`crates/ember-control/openapi.json`) by the renderer below, and this test
//! fails when the two drift apart. After an API change (and
//! `EMBER_UPDATE_OPENAPI=1 cargo nextest run -p ember-control --test openapi`):
//!
//! ```text
//! EMBER_UPDATE_DOCS=1 cargo nextest run -p ember-cli --test api_docs
//! ```
//!
//! The renderer knows the shapes utoipa emits (refs, nullable type lists,
//! maps, arrays, enums, `oneOf` tagged unions, `allOf` extension), and fails
//! on anything else rather than printing it wrong.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::PathBuf;

use serde_json::Value;

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

fn root() -> PathBuf {
    ember_testkit::workspace_root()
}

#[test]
fn api_docs_match_the_openapi_document() {
    let spec_path = root().join("crates/ember-control/openapi.json");
    let spec: Value = serde_json::from_str(&std::fs::read_to_string(&spec_path).unwrap()).unwrap();
    let rendered = render(&spec);
    let docs_path = root().join("docs/api.md");
    if std::env::var_os("EMBER_UPDATE_DOCS").is_some() {
        std::fs::create_dir_all(docs_path.parent().unwrap()).unwrap();
        std::fs::write(&docs_path, &rendered).unwrap();
        return;
    }
    let current = std::fs::read_to_string(&docs_path).unwrap_or_default();
    if current != rendered {
        let line = current
            .lines()
            .zip(rendered.lines())
            .position(|(a, b)| a != b)
            .map_or_else(
                || current.lines().count().min(rendered.lines().count()) + 1,
                |i| i + 1,
            );
        panic!(
            "docs/api.md differs from what crates/ember-control/openapi.json renders to \
             (first difference at line {line}); regenerate it with\n  \
             EMBER_UPDATE_DOCS=1 cargo nextest run -p ember-cli --test api_docs"
        );
    }
}

#[test]
fn the_renderer_covers_every_operation_and_schema() {
    let spec_path = root().join("crates/ember-control/openapi.json");
    let spec: Value = serde_json::from_str(&std::fs::read_to_string(&spec_path).unwrap()).unwrap();
    let doc = render(&spec);
    let paths = spec["paths"].as_object().unwrap();
    assert!(!paths.is_empty());
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            let heading = format!("### `{} {path}`", method.to_uppercase());
            assert!(doc.contains(&heading), "{heading} is missing");
        }
    }
    for name in spec["components"]["schemas"].as_object().unwrap().keys() {
        assert!(
            doc.contains(&format!("\n### {name}\n")),
            "schema {name} is missing"
        );
    }
}

/// One line for a table cell or a heading: newlines joined, pipes escaped.
fn cell(s: &str) -> String {
    s.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

fn anchor(name: &str) -> String {
    name.to_lowercase()
}

fn ref_name(r: &str) -> &str {
    r.rsplit('/').next().unwrap()
}

/// A schema's type, for a table cell.
fn ty(schema: &Value) -> String {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let n = ref_name(r);
        return format!("[{n}](#{})", anchor(n));
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        let values: Vec<String> = e
            .iter()
            .map(|v| format!("`{}`", v.as_str().unwrap_or("?")))
            .collect();
        return format!("one of {}", values.join(", "));
    }
    if let Some(variants) = schema.get("oneOf").and_then(Value::as_array) {
        let parts: Vec<String> = variants.iter().map(ty).collect();
        return parts.join(" or ");
    }
    let (base, nullable) = match schema.get("type") {
        Some(Value::String(t)) => (t.clone(), false),
        Some(Value::Array(ts)) => {
            let named: Vec<&str> = ts
                .iter()
                .filter_map(Value::as_str)
                .filter(|t| *t != "null")
                .collect();
            assert_eq!(named.len(), 1, "unsupported type list {ts:?}");
            (named[0].to_owned(), ts.iter().any(|t| t == "null"))
        }
        None if schema.as_object().is_some_and(|o| o.is_empty()) => ("any".to_owned(), false),
        other => panic!("unsupported schema type {other:?} in {schema}"),
    };
    let mut out = match base.as_str() {
        "array" => format!("array of {}", ty(&schema["items"])),
        "object" => match schema.get("additionalProperties") {
            Some(v @ Value::Object(_)) => format!("map of string to {}", ty(v)),
            _ => "object".to_owned(),
        },
        "integer" | "number" => match schema.get("format").and_then(Value::as_str) {
            Some(f) => format!("{base} ({f})"),
            None => base,
        },
        "string" => match schema.get("format").and_then(Value::as_str) {
            Some("binary") => "bytes".to_owned(),
            Some(f) => format!("string ({f})"),
            None => base,
        },
        _ => base,
    };
    if nullable {
        out.push_str(", optional");
    }
    out
}

/// A table of an object schema's fields.
fn fields_table(out: &mut String, schema: &Value) {
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let Some(props) = schema.get("properties").and_then(Value::as_object) else {
        out.push_str("No fields.\n\n");
        return;
    };
    let props: BTreeMap<&String, &Value> = props.iter().collect();
    out.push_str("| field | type | required | description |\n|---|---|---|---|\n");
    for (name, p) in props {
        let _ = writeln!(
            out,
            "| `{name}` | {} | {} | {} |",
            ty(p),
            if required.contains(&name.as_str()) {
                "yes"
            } else {
                ""
            },
            cell(p.get("description").and_then(Value::as_str).unwrap_or(""))
        );
    }
    out.push('\n');
}

fn schema_section(out: &mut String, name: &str, schema: &Value) {
    let _ = writeln!(out, "### {name}\n");
    if let Some(d) = schema.get("description").and_then(Value::as_str) {
        let _ = writeln!(out, "{}\n", d.trim());
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        let values: Vec<String> = e
            .iter()
            .map(|v| format!("`{}`", v.as_str().unwrap_or("?")))
            .collect();
        let _ = writeln!(out, "A string, one of: {}.\n", values.join(", "));
    } else if let Some(variants) = schema.get("oneOf").and_then(Value::as_array) {
        out.push_str("One of these objects, told apart by `type`:\n\n");
        for v in variants {
            let tag = v["properties"]["type"]["enum"][0].as_str().unwrap_or("?");
            let _ = writeln!(out, "`\"type\": \"{tag}\"`",);
            if let Some(d) = v.get("description").and_then(Value::as_str) {
                let _ = writeln!(out, "— {}", cell(d));
            }
            out.push('\n');
            fields_table(out, v);
        }
    } else if let Some(parts) = schema.get("allOf").and_then(Value::as_array) {
        for p in parts {
            if let Some(r) = p.get("$ref").and_then(Value::as_str) {
                let n = ref_name(r);
                let _ = writeln!(out, "Every field of [{n}](#{}), and:\n", anchor(n));
            } else {
                fields_table(out, p);
            }
        }
    } else {
        assert_eq!(
            schema.get("type").and_then(Value::as_str),
            Some("object"),
            "unsupported schema {name}: {schema}"
        );
        fields_table(out, schema);
    }
}

fn body_types(content: &Value) -> String {
    let Some(c) = content.as_object() else {
        return String::new();
    };
    c.iter()
        .map(|(mime, m)| {
            let t = m.get("schema").map(ty).unwrap_or_default();
            match mime.as_str() {
                "application/json" => t,
                "application/octet-stream" => format!("bytes (`{mime}`)"),
                _ => format!("{t} (`{mime}`)"),
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn operation(out: &mut String, method: &str, path: &str, op: &Value) {
    let _ = writeln!(out, "### `{} {path}`\n", method.to_uppercase());
    if let Some(s) = op.get("summary").and_then(Value::as_str) {
        let _ = writeln!(out, "{}\n", cell(s));
    }
    if let Some(d) = op.get("description").and_then(Value::as_str) {
        let _ = writeln!(out, "{}\n", d.trim());
    }
    let auth: Vec<String> = op
        .get("security")
        .and_then(Value::as_array)
        .map(|s| {
            s.iter()
                .flat_map(|req| req.as_object().into_iter().flat_map(|o| o.keys().cloned()))
                .map(|k| format!("`{k}`"))
                .collect()
        })
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "Authentication: {}.\n",
        if auth.is_empty() {
            "none".to_owned()
        } else {
            auth.join(" or ")
        }
    );
    if let Some(params) = op.get("parameters").and_then(Value::as_array)
        && !params.is_empty()
    {
        out.push_str("| parameter | in | type | required | description |\n|---|---|---|---|---|\n");
        for p in params {
            let _ = writeln!(
                out,
                "| `{}` | {} | {} | {} | {} |",
                p["name"].as_str().unwrap_or("?"),
                p["in"].as_str().unwrap_or("?"),
                p.get("schema").map(ty).unwrap_or_default(),
                if p["required"].as_bool() == Some(true) {
                    "yes"
                } else {
                    ""
                },
                cell(p.get("description").and_then(Value::as_str).unwrap_or(""))
            );
        }
        out.push('\n');
    }
    if let Some(body) = op.get("requestBody") {
        let _ = writeln!(
            out,
            "Request body{}: {}{}\n",
            if body["required"].as_bool() == Some(true) {
                ""
            } else {
                " (optional)"
            },
            body_types(&body["content"]),
            body.get("description")
                .and_then(Value::as_str)
                .map(|d| format!(" — {}", cell(d)))
                .unwrap_or_default(),
        );
    }
    out.push_str("| status | meaning | body |\n|---|---|---|\n");
    let responses = op["responses"].as_object().expect("responses");
    let responses: BTreeMap<&String, &Value> = responses.iter().collect();
    for (status, r) in responses {
        let meaning = match r.get("description").and_then(Value::as_str) {
            Some(d) if !d.trim().is_empty() => cell(d),
            _ => status
                .parse::<u16>()
                .ok()
                .and_then(|s| reqwest::StatusCode::from_u16(s).ok())
                .and_then(|s| s.canonical_reason())
                .unwrap_or("")
                .to_owned(),
        };
        let _ = writeln!(
            out,
            "| {status} | {meaning} | {} |",
            r.get("content").map(body_types).unwrap_or_default()
        );
    }
    out.push('\n');
}

/// The whole page.
fn render(spec: &Value) -> String {
    let mut out = String::new();
    let info = &spec["info"];
    let _ = writeln!(
        out,
        "# {} v{}\n",
        info["title"].as_str().unwrap_or("API"),
        info["version"].as_str().unwrap_or("?")
    );
    out.push_str(
        "<!-- Generated from crates/ember-control/openapi.json by crates/ember-cli/tests/api_docs.rs; do not edit.\n     \
         Regenerate: EMBER_UPDATE_DOCS=1 cargo nextest run -p ember-cli --test api_docs -->\n\n",
    );
    if let Some(d) = info.get("description").and_then(Value::as_str) {
        let _ = writeln!(out, "{}\n", d.trim());
    }
    out.push_str(
        "The machine-readable document is [`crates/ember-control/openapi.json`](../crates/ember-control/openapi.json) \
         (OpenAPI 3.1); `ember server` serves the same API.\n\n",
    );

    out.push_str("## Authentication\n\n");
    if let Some(schemes) = spec["components"]["securitySchemes"].as_object() {
        let schemes: BTreeMap<&String, &Value> = schemes.iter().collect();
        for (name, s) in schemes {
            let _ = writeln!(
                out,
                "- `{name}` (HTTP `Authorization: Bearer …`): {}",
                cell(s.get("description").and_then(Value::as_str).unwrap_or(""))
            );
        }
        out.push('\n');
    }

    // Operations grouped by tag, in the document's tag order.
    let tags: Vec<(String, String)> = spec["tags"]
        .as_array()
        .map(|t| {
            t.iter()
                .map(|t| {
                    (
                        t["name"].as_str().unwrap_or("").to_owned(),
                        t.get("description")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let paths: BTreeMap<&String, &Value> =
        spec["paths"].as_object().expect("paths").iter().collect();
    let mut by_tag: BTreeMap<String, Vec<(&str, &str, &Value)>> = BTreeMap::new();
    for (path, ops) in &paths {
        for method in METHODS {
            if let Some(op) = ops.get(method) {
                let tag = op["tags"][0].as_str().unwrap_or("other").to_owned();
                by_tag
                    .entry(tag)
                    .or_default()
                    .push((method, path.as_str(), op));
            }
        }
    }
    for (path, ops) in &paths {
        for m in ops.as_object().unwrap().keys() {
            assert!(
                METHODS.contains(&m.as_str()),
                "unsupported method {m} on {path}"
            );
        }
    }

    out.push_str("## Endpoints\n\n| method | path | what |\n|---|---|---|\n");
    let ordered: Vec<&String> = tags
        .iter()
        .map(|(n, _)| n)
        .chain(by_tag.keys().filter(|k| !tags.iter().any(|(n, _)| n == *k)))
        .collect();
    for tag in &ordered {
        for (method, path, op) in by_tag.get(*tag).into_iter().flatten() {
            let summary = cell(op.get("summary").and_then(Value::as_str).unwrap_or(""));
            let first = summary
                .split(". ")
                .next()
                .unwrap_or("")
                .trim_end_matches('.');
            let _ = writeln!(out, "| {} | `{path}` | {first} |", method.to_uppercase());
        }
    }
    out.push('\n');

    for tag in &ordered {
        let Some(ops) = by_tag.get(*tag) else {
            continue;
        };
        let description = tags
            .iter()
            .find(|(n, _)| n == *tag)
            .map(|(_, d)| d.as_str())
            .unwrap_or("");
        let mut title = tag.to_string();
        if let Some(f) = title.get_mut(0..1) {
            f.make_ascii_uppercase();
        }
        let _ = writeln!(out, "## {title}\n");
        if !description.is_empty() {
            let _ = writeln!(out, "{description}.\n");
        }
        for (method, path, op) in ops {
            operation(&mut out, method, path, op);
        }
    }

    out.push_str("## Schemas\n\n");
    let schemas: BTreeMap<&String, &Value> = spec["components"]["schemas"]
        .as_object()
        .expect("schemas")
        .iter()
        .collect();
    for (name, schema) in schemas {
        schema_section(&mut out, name, schema);
    }
    while out.ends_with("\n\n") {
        out.pop();
    }
    out
}
