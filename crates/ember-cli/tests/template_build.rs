//! Templates built from container images and Dockerfiles, end to end: a
//! busybox image pushed by skopeo to a real registry on loopback, a real
//! `ember server` with its embedded agent (QEMU microVMs under TCG here: no
//! security boundary; see MACHINE.md), builds started with the real
//! `ember template build` and over REST, and sandboxes made from the
//! result answering on the template's port at once.

#[macro_use]
mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::agent::AgentHome;
use support::images::*;
use support::server::{Api, ServerSpec, TestDb};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Poll a build until it ends; returns it with its whole log.
async fn finished(api: &Api, name: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let (st, b) = api.get(&format!("/v1/templates/{name}/builds/{id}")).await;
        assert_eq!(st, StatusCode::OK, "{b}");
        if b["status"] == "ready" || b["status"] == "failed" {
            return b;
        }
        assert!(Instant::now() < deadline, "build {id} still running: {b}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Start a build over REST; returns its ID.
async fn start_build(api: &Api, body: Value) -> String {
    let (st, b) = api.post("/v1/templates", body.clone()).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{body}: {b}");
    assert_eq!(b["status"], "queued", "{b}");
    b["build_id"].as_str().unwrap().to_owned()
}

fn write_context(dir: &Path) {
    std::fs::create_dir_all(dir.join("site")).unwrap();
    std::fs::write(dir.join("site/index.html"), "served from the template\n").unwrap();
    std::fs::write(dir.join("site/extra.txt"), "extra\n").unwrap();
}

fn dockerfile(registry: &str, run_line: &str) -> String {
    format!(
        "# a service frozen while it serves\n\
         FROM docker://{registry}/busy:v1\n\
         ARG GREETING=hello\n\
         ENV SITE=/srv/www\n\
         WORKDIR /srv/www\n\
         COPY site/ ./\n\
         {run_line}\n\
         CMD [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/srv/www\"]\n"
    )
}

fn tar_base64(dir: &Path) -> String {
    use base64::Engine;
    let mut tar = tar::Builder::new(Vec::new());
    tar.append_dir_all(".", dir).unwrap();
    base64::engine::general_purpose::STANDARD.encode(tar.into_inner().unwrap())
}

#[test]
fn a_dockerfile_becomes_a_template_serving_at_once_root_vm() {
    require_vm!();
    require_import!();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    write_layout(&layout, &busybox_layers(), "amd64");
    let registry = Registry::start(None);
    registry.push(&layout, "busy:v1", None);

    let db = TestDb::sqlite();
    let home = AgentHome::new();
    let server = ServerSpec::new(&db, Some(&home))
        .arg("--insecure-registry")
        .arg(&registry.address)
        .start();
    let key = server.admin_key.clone().unwrap();
    let api = server.api(&key);
    let context = work.path().join("context");
    write_context(&context);
    let run_line = "RUN echo \"$GREETING from $SITE\" > built.txt && echo step-output";
    std::fs::write(
        context.join("Dockerfile"),
        dockerfile(&registry.address, run_line),
    )
    .unwrap();

    // The real CLI: the context goes up, each step and its output come back.
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args([
            "template",
            "build",
            "-t",
            "web",
            "--ready-port",
            "8080",
            "-f",
        ])
        .arg(context.join("Dockerfile"))
        .env("EMBER_API_URL", &server.base)
        .env("EMBER_API_KEY", &key)
        .output()
        .unwrap();
    let cold_build = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "ember template build: {stdout}\n{stderr}\n{}",
        server.logs()
    );
    eprintln!("ember template build:\n{stdout}");
    // The baseline, measured in the same run: the build booted the image
    // cold and waited for the service to answer.
    let seconds_after = |marker: &str| -> f64 {
        let line = stdout
            .lines()
            .find(|l| l.contains(marker))
            .unwrap_or_else(|| panic!("{marker:?} not in the build log"));
        let s = line.split(" in ").last().unwrap().trim_end_matches(" s");
        s.parse()
            .unwrap_or_else(|_| panic!("no seconds in {line:?}"))
    };
    let cold_boot_and_start = seconds_after(" up in ") + seconds_after("  ready in ");
    for needle in [
        "step 1/8: FROM docker://",
        "step 5/8: COPY site/ ./",
        "| step-output",
        "cached as .cache-",
        "step 8/8: start /bin/busybox httpd",
        "waiting until port 8080 accepts connections",
        "template web is ready",
    ] {
        assert!(stdout.contains(needle), "{needle:?} not in:\n{stdout}");
    }

    runtime().block_on(async {
        // The step cache is hidden; the template is listed.
        let (_, list) = api.get("/v1/templates").await;
        let names: Vec<&str> = list["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["web"], "{list}");

        // A sandbox from it answers on the port with no start-up wait: the
        // first request is the test (no retry loop).
        let t = Instant::now();
        let sb = api.create(json!({"template": "web", "timeout_s": 300})).await;
        let id = sb["id"].as_str().unwrap();
        let first = api
            .exec(
                id,
                json!({"cmd": "/bin/busybox", "args": ["wget", "-qO-", "http://127.0.0.1:8080/index.html"]}),
            )
            .await;
        let to_first_answer = t.elapsed();
        assert_eq!(first.exit_code, Some(0), "{first:?}");
        assert_eq!(first.stdout, "served from the template\n");
        let built = api.sh(id, "cat /srv/www/built.txt /srv/www/extra.txt").await;
        assert_eq!(built.stdout, "hello from /srv/www\nextra\n", "{built:?}");
        // Its sandboxes inherit the image's Env and the Dockerfile's ENV
        // (not its ARGs), under their own.
        let env = api
            .exec(
                id,
                json!({"cmd": "/bin/sh", "args": ["-c", "echo $SITE $GREETING $PATH"]}),
            )
            .await;
        assert_eq!(env.stdout, "/srv/www from-image /bin\n", "{env:?}");
        // An exec naming no directory runs in the template's WORKDIR.
        let pwd = api
            .exec(id, json!({"cmd": "/bin/sh", "args": ["-c", "pwd"]}))
            .await;
        assert_eq!(pwd.stdout, "/srv/www\n", "{pwd:?}");
        let (_, t) = api.get("/v1/templates/web").await;
        assert_eq!(t["defaults"]["workdir"], "/srv/www", "{t}");
        assert_eq!(t["defaults"]["start"][1], "httpd", "{t}");
        let names = t["defaults"]["env_names"].to_string();
        assert!(names.contains("SITE") && names.contains("GREETING"), "{t}");
        assert!(!t.to_string().contains("from-image"), "env values are never returned: {t}");
        eprintln!(
            "measured: cold build {:.1} s; create from the template to its first HTTP answer {:.2} s, \
             against {cold_boot_and_start:.2} s to boot the image cold and start the service ({:.1}x)",
            cold_build.as_secs_f64(),
            to_first_answer.as_secs_f64(),
            cold_boot_and_start / to_first_answer.as_secs_f64()
        );
        let (st, _) = api.delete(&format!("/v1/sandboxes/{id}")).await;
        assert_eq!(st, StatusCode::NO_CONTENT);

        // The same steps again: everything up to the RUN comes from the cache.
        let t = Instant::now();
        let again = start_build(
            &api,
            json!({
                "name": "web2",
                "dockerfile": dockerfile(&registry.address, run_line),
                "context_tar_base64": tar_base64(&context),
                "ready_port": 8080,
            }),
        )
        .await;
        let b = finished(&api, "web2", &again).await;
        let cached_build = t.elapsed();
        assert_eq!(b["status"], "ready", "{b}");
        assert_eq!(b["cached_steps"], 6, "{b}");
        assert!(
            b["log"].as_str().unwrap().contains("steps 1 to 6 cached"),
            "{b}"
        );
        assert!(!b["log"].as_str().unwrap().contains("step-output"), "{b}");
        eprintln!(
            "measured: cached rebuild {:.1} s (cold {:.1} s)",
            cached_build.as_secs_f64(),
            cold_build.as_secs_f64()
        );

        // A changed build argument changes the RUN: not cached, new output.
        let changed = start_build(
            &api,
            json!({
                "name": "web3",
                "dockerfile": dockerfile(&registry.address, run_line),
                "context_tar_base64": tar_base64(&context),
                "build_args": {"GREETING": "hi"},
            }),
        )
        .await;
        let b = finished(&api, "web3", &changed).await;
        assert_eq!(b["status"], "ready", "{b}");
        assert_eq!(b["cached_steps"], 5, "the COPY is still cached: {b}");
        let sb = api.create(json!({"template": "web3", "timeout_s": 300})).await;
        let id = sb["id"].as_str().unwrap();
        let built = api.sh(id, "cat /srv/www/built.txt").await;
        assert_eq!(built.stdout, "hi from /srv/www\n", "{built:?}");
        api.delete(&format!("/v1/sandboxes/{id}")).await;

        // An image alone: its Cmd is the start command, its WorkingDir and
        // Env the template's defaults.
        let plain = start_build(
            &api,
            json!({"name": "plain", "image": format!("docker://{}/busy:v1", registry.address)}),
        )
        .await;
        let b = finished(&api, "plain", &plain).await;
        assert_eq!(b["status"], "ready", "{b}");
        assert!(b["log"].as_str().unwrap().contains("step 2/2: start sh"), "{b}");
        let sb = api
            .create(json!({"template": "plain", "timeout_s": 300, "env": {"CALLER": "x"}}))
            .await;
        let id = sb["id"].as_str().unwrap();
        let env = api
            .exec(id, json!({"cmd": "/bin/sh", "args": ["-c", "echo $GREETING $CALLER"]}))
            .await;
        assert_eq!(env.stdout, "from-image x\n", "{env:?}");
        let pwd = api
            .exec(id, json!({"cmd": "/bin/sh", "args": ["-c", "pwd"]}))
            .await;
        assert_eq!(pwd.stdout, "/opt/app\n", "the image's WorkingDir: {pwd:?}");
        api.delete(&format!("/v1/sandboxes/{id}")).await;

        // A failing step: its command, exit code and output; no template,
        // and the build sandbox is gone.
        let failing = start_build(
            &api,
            json!({
                "name": "broken",
                "dockerfile": dockerfile(&registry.address, "RUN echo about-to-fail && exit 3"),
                "context_tar_base64": tar_base64(&context),
            }),
        )
        .await;
        let b = finished(&api, "broken", &failing).await;
        assert_eq!(b["status"], "failed", "{b}");
        let error = b["error"].as_str().unwrap();
        for needle in ["line 7", "RUN echo about-to-fail && exit 3", "exited with code 3", "about-to-fail"] {
            assert!(error.contains(needle), "{needle:?} not in {error}");
        }
        let (st, _) = api.get("/v1/templates/broken").await;
        assert_eq!(st, StatusCode::NOT_FOUND);

        // An image the registry lacks: the pull's error, nothing left.
        let missing = start_build(
            &api,
            json!({"name": "nope", "image": format!("docker://{}/busy:nope", registry.address)}),
        )
        .await;
        let b = finished(&api, "nope", &missing).await;
        assert_eq!(b["status"], "failed", "{b}");
        assert!(
            b["error"].as_str().unwrap().contains("busy:nope"),
            "{b}"
        );

        // A registry on this host's network that the operator did not list:
        // refused, so callers cannot reach into it through the agent.
        let port = registry.address.rsplit(':').next().unwrap();
        let inside = start_build(
            &api,
            json!({"name": "inside", "image": format!("docker://localhost:{port}/busy:v1")}),
        )
        .await;
        let b = finished(&api, "inside", &inside).await;
        assert_eq!(b["status"], "failed", "{b}");
        let error = b["error"].as_str().unwrap();
        assert!(
            error.contains("loopback address") && error.contains("--private-registry"),
            "{error}"
        );

        // Refused before anything starts: an unsupported instruction (with
        // its line), a taken name, a context entry leaving the context.
        let (st, e) = api
            .post(
                "/v1/templates",
                json!({"name": "x", "dockerfile": "FROM base\nHEALTHCHECK CMD true\n"}),
            )
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{e}");
        assert!(e["message"].as_str().unwrap().contains("line 2: HEALTHCHECK"), "{e}");
        let (st, e) = api
            .post(
                "/v1/templates",
                json!({"name": "web", "image": format!("docker://{}/busy:v1", registry.address)}),
            )
            .await;
        assert_eq!(st, StatusCode::CONFLICT, "{e}");

        // No build sandbox is left running.
        let (_, list) = api.get("/v1/sandboxes").await;
        let running: Vec<&Value> = list["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["state"] == "running")
            .collect();
        assert!(running.is_empty(), "{list}");
    });
}
