//! The store suite, run on SQLite and on PostgreSQL alike.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use ember_control::model::{
    Build, BuildKind, Host, NetworkPolicy, OnTimeout, Sandbox, SandboxState, Team, Template,
    TemplateBuild, now_ms,
};
use ember_control::store::{
    CapacityCheck, Changes, PageAfter, SandboxFilter, Store, TeamQuota, TeamUsage,
};

async fn open(url: &str) -> Store {
    Store::open(url).await.expect("open store")
}

async fn team(store: &Store, name: &str) -> Team {
    let t = Team {
        id: ember_types::TeamId::new().to_string(),
        name: name.into(),
        is_admin: false,
        created_at: now_ms(),
    };
    assert!(store.insert_team(&t).await.unwrap());
    t
}

async fn host(store: &Store, id: &str) -> Host {
    let h = Host {
        id: id.into(),
        address: format!("http://{id}:7001"),
        backend: "qemu".into(),
        version: "0.1.0".into(),
        vcpus_total: 4,
        memory_mib_total: 8192,
        healthy: true,
        last_error: None,
        registered_at: now_ms(),
        last_seen_at: None,
    };
    store.upsert_host(&h).await.unwrap();
    h
}

fn sandbox(team: &str, host: &str, state: SandboxState, created_at: i64) -> Sandbox {
    Sandbox {
        id: ember_types::SandboxId::new().to_string(),
        team_id: team.into(),
        state,
        host_id: Some(host.into()),
        template: "base".into(),
        source_build_id: None,
        build_id: None,
        vcpus: 1,
        memory_mib: 512,
        metadata: BTreeMap::new(),
        env: BTreeMap::from([("SECRET".into(), "x".into())]),
        network: NetworkPolicy::default(),
        timeout_s: 60,
        on_timeout: OnTimeout::Kill,
        expires_at: None,
        access_token_sha256: "00".repeat(32),
        failure_reason: None,
        created_at,
        state_changed_at: created_at,
        destroyed_at: None,
        last_operation: None,
        ingress: Default::default(),
    }
}

fn build(team: &str, host: &str, kind: BuildKind) -> Build {
    Build {
        id: ember_types::BuildId::new().to_string(),
        team_id: team.into(),
        host_id: host.into(),
        kind,
        source_sandbox_id: None,
        vcpus: 2,
        memory_mib: 1024,
        stored_bytes: 4096,
        created_at: now_ms(),
        released_at: None,
    }
}

fn template(team: &str, name: &str, build: &Build) -> Template {
    Template {
        id: ember_types::TemplateId::new().to_string(),
        team_id: team.into(),
        name: name.into(),
        build_id: build.id.clone(),
        vcpus: build.vcpus,
        memory_mib: build.memory_mib,
        source_sandbox_id: None,
        size_bytes: build.stored_bytes,
        created_at: now_ms(),
        defaults: None,
    }
}

on_both_stores!(
    migrations_apply_from_empty_and_only_once,
    a_state_transition_has_exactly_one_winner,
    concurrent_placements_never_overcommit_a_host,
    concurrent_placements_never_overrun_a_team_quota,
    every_query_is_scoped_by_team,
    api_keys_are_stored_only_as_hashes,
    template_names_are_unique_per_team,
    build_references_count_templates_and_live_sandboxes,
    listing_paginates_and_filters,
    expiry_and_purge,
    concurrent_first_starts_agree_on_one_setting,
    host_credentials_are_kept_revoked_and_removed,
    a_join_token_admits_one_host,
    storage_counts_the_builds_of_paused_sandboxes_and_templates,
    concurrent_templates_never_overrun_a_team_quota,
    template_builds_keep_progress_and_orphans_fail,
);

async fn concurrent_templates_never_overrun_a_team_quota(url: &str) {
    use ember_control::store::TemplateInsert;
    let store = open(url).await;
    let a = team(&store, "a").await;
    let b = team(&store, "b").await;
    let h = host(&store, "host-a").await;
    let tries = (0..6).map(|i| {
        let store = store.clone();
        let bl = build(&a.id, &h.id, BuildKind::Template);
        let tpl = template(&a.id, &format!("t{i}"), &bl);
        tokio::spawn(async move { store.insert_template_within(&bl, &tpl, Some(2)).await })
    });
    let mut inserted = 0;
    for t in tries.collect::<Vec<_>>() {
        match t.await.unwrap().unwrap() {
            TemplateInsert::Inserted => inserted += 1,
            TemplateInsert::OverQuota { would } => assert_eq!(would, 3),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(inserted, 2, "exactly the quota's worth");
    let usage = store.team_usage(&a.id).await.unwrap();
    assert_eq!(usage.templates, 2);
    let bl = build(&b.id, &h.id, BuildKind::Template);
    assert_eq!(
        store
            .insert_template_within(&bl, &template(&b.id, "t0", &bl), Some(2))
            .await
            .unwrap(),
        TemplateInsert::Inserted,
        "another team's quota is its own"
    );
    store.close().await;
}

async fn storage_counts_the_builds_of_paused_sandboxes_and_templates(url: &str) {
    let store = open(url).await;
    let a = team(&store, "a").await;
    let b = team(&store, "b").await;
    let h = host(&store, "host-a").await;
    let sized = |team: &str, kind, bytes| Build {
        stored_bytes: bytes,
        ..build(team, &h.id, kind)
    };
    // A paused sandbox's build, a template's, and a running sandbox's
    // (not counted: it is the parent of its next pause, not a hold).
    let mut counted = 0;
    for (state, bytes) in [
        (SandboxState::Paused, 3 << 20),
        (SandboxState::Running, 7 << 20),
    ] {
        let bl = sized(&a.id, BuildKind::Pause, bytes);
        store.insert_build(&bl).await.unwrap();
        let sb = Sandbox {
            build_id: Some(bl.id.clone()),
            ..sandbox(&a.id, &h.id, state, now_ms())
        };
        assert!(store.insert_sandbox(&sb, None).await.unwrap());
        if state == SandboxState::Paused {
            counted += bytes;
        }
    }
    let bl = sized(&a.id, BuildKind::Template, (1 << 20) + 1);
    assert!(
        store
            .insert_template(&bl, &template(&a.id, "t", &bl))
            .await
            .unwrap()
    );
    counted += (1 << 20) + 1;
    let other = sized(&b.id, BuildKind::Template, 50 << 20);
    assert!(
        store
            .insert_template(&other, &template(&b.id, "t", &other))
            .await
            .unwrap()
    );
    let usage = store.team_usage(&a.id).await.unwrap();
    assert_eq!(usage.storage_bytes, counted);
    assert_eq!(usage.storage_mib(), 5, "rounded up");
    assert_eq!(store.team_usage(&b.id).await.unwrap().storage_mib(), 50);
    store.close().await;
}

async fn host_credentials_are_kept_revoked_and_removed(url: &str) {
    let store = open(url).await;
    let h = host(&store, "host-a").await;
    assert_eq!(store.host_credential(&h.id).await.unwrap(), None);
    let cred = ember_control::model::HostCredential {
        host_id: h.id.clone(),
        credential_hash: Some(ember_control::auth::sha256_hex("emberhost_x")),
        control_token: "embercontrol_y".into(),
        tls_cert: Some("-----BEGIN CERTIFICATE-----".into()),
        issued_at: 1,
        revoked_at: None,
    };
    store.put_host_credential(&cred).await.unwrap();
    assert_eq!(
        store.host_credential(&h.id).await.unwrap(),
        Some(cred.clone())
    );
    // A re-registration replaces what it brings.
    let moved = ember_control::model::HostCredential {
        control_token: "embercontrol_z".into(),
        ..cred.clone()
    };
    store.put_host_credential(&moved).await.unwrap();
    assert_eq!(store.host_credential(&h.id).await.unwrap(), Some(moved));
    assert!(store.revoke_host_credential(&h.id, 7).await.unwrap());
    assert!(store.revoke_host_credential(&h.id, 9).await.unwrap());
    let revoked = store.host_credential(&h.id).await.unwrap().unwrap();
    assert_eq!(
        revoked.revoked_at,
        Some(7),
        "the first revocation's time stays"
    );
    assert!(!store.revoke_host_credential("host-none", 7).await.unwrap());
    let all = store.host_credentials().await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all.get(&h.id), Some(&revoked));
    assert!(store.delete_host(&h.id, 10).await.unwrap());
    assert_eq!(store.host(&h.id).await.unwrap(), None);
    assert_eq!(store.host_credential(&h.id).await.unwrap(), None);
    assert!(!store.delete_host(&h.id, 10).await.unwrap());
    store.close().await;
}

async fn a_join_token_admits_one_host(url: &str) {
    use ember_control::model::JoinToken;
    let store = open(url).await;
    let token = |id: &str, expires_at: i64| JoinToken {
        id: id.into(),
        token_hash: ember_control::auth::sha256_hex(id),
        created_at: 1,
        expires_at,
        created_by: Some("admin".into()),
        used_at: None,
        used_by_host: None,
        revoked_at: None,
    };
    let t = token("jt-a", 1_000);
    store.insert_join_token(&t).await.unwrap();
    assert_eq!(
        store.join_token_by_hash(&t.token_hash).await.unwrap(),
        Some(t.clone())
    );
    // Hosts racing for one token: exactly one wins it.
    let claims = (0..8).map(|i| {
        let store = store.clone();
        async move {
            store
                .claim_join_token("jt-a", &format!("host-{i}"), 10)
                .await
                .unwrap()
        }
    });
    let won = futures::future::join_all(claims).await;
    assert_eq!(won.iter().filter(|w| **w).count(), 1, "{won:?}");
    let used = store
        .join_token_by_hash(&t.token_hash)
        .await
        .unwrap()
        .unwrap();
    let winner = used.used_by_host.clone().unwrap();
    assert_eq!(used.used_at, Some(10));
    // Its host may retry (its answer was lost) until the token expires.
    assert!(store.claim_join_token("jt-a", &winner, 20).await.unwrap());
    assert!(
        !store
            .claim_join_token("jt-a", &winner, 1_000)
            .await
            .unwrap()
    );
    let again = store
        .join_token_by_hash(&t.token_hash)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.used_at, Some(10), "the first use's time stays");
    // Expired or revoked: no use.
    store.insert_join_token(&token("jt-old", 5)).await.unwrap();
    assert!(!store.claim_join_token("jt-old", "host-x", 5).await.unwrap());
    store
        .insert_join_token(&token("jt-revoked", 1_000))
        .await
        .unwrap();
    assert!(store.revoke_join_token("jt-revoked", 3).await.unwrap());
    assert!(
        !store
            .claim_join_token("jt-revoked", "host-x", 4)
            .await
            .unwrap()
    );
    assert!(!store.revoke_join_token("jt-none", 3).await.unwrap());
    // Removing the host it admitted revokes it.
    let h = host(&store, &winner).await;
    assert!(store.delete_host(&h.id, 30).await.unwrap());
    assert!(!store.claim_join_token("jt-a", &winner, 31).await.unwrap());
    let listed = store.list_join_tokens(0).await.unwrap();
    assert_eq!(listed.len(), 3);
    assert_eq!(
        listed.iter().find(|t| t.id == "jt-a").unwrap().revoked_at,
        Some(30)
    );
    assert_eq!(store.list_join_tokens(2_000).await.unwrap(), vec![]);
    store.close().await;
}

async fn migrations_apply_from_empty_and_only_once(url: &str) {
    let store = open(url).await;
    let rows = store
        .fetch_all_text("SELECT version, name FROM schema_migrations")
        .await
        .unwrap();
    assert_eq!(
        rows,
        vec![
            vec![Some("1".into()), Some("initial".into())],
            vec![Some("2".into()), Some("last_operation".into())],
            vec![Some("3".into()), Some("ingress".into())],
            vec![Some("4".into()), Some("key_roles_audit".into())],
            vec![Some("5".into()), Some("running_since".into())],
            vec![Some("6".into()), Some("host_credentials".into())],
            vec![Some("7".into()), Some("join_tokens".into())],
            vec![Some("8".into()), Some("template_builds".into())],
        ]
    );
    store.close().await;
    // Reopening applies nothing twice and keeps data.
    let store = open(url).await;
    let t = team(&store, "a").await;
    store.close().await;
    let store = open(url).await;
    assert_eq!(store.team(&t.id).await.unwrap(), Some(t.clone()));
    let rows = store
        .fetch_all_text("SELECT COUNT(*) FROM schema_migrations")
        .await
        .unwrap();
    assert_eq!(rows[0][0].as_deref(), Some("8"));
    if store.backend() == ember_control::store::Backend::Sqlite {
        let fk = store.fetch_all_text("PRAGMA foreign_keys").await.unwrap();
        assert_eq!(fk[0][0].as_deref(), Some("1"), "foreign keys must be on");
        let wal = store.fetch_all_text("PRAGMA journal_mode").await.unwrap();
        assert_eq!(wal[0][0].as_deref(), Some("wal"));
    }
    // Foreign keys hold on both databases: a sandbox of an unknown team is refused.
    let orphan = sandbox(
        "team-nosuchteamxxxxxxxxxx",
        "nohost",
        SandboxState::Running,
        now_ms(),
    );
    assert!(store.insert_sandbox(&orphan, None).await.is_err());

    // How a sandbox's ports are reached round-trips, and changes in place.
    let h = host(&store, "host-a").await;
    let mut sb = sandbox(&t.id, &h.id, SandboxState::Running, now_ms());
    sb.ingress.public = true;
    assert!(store.insert_sandbox(&sb, None).await.unwrap());
    let got = store.sandbox(Some(&t.id), &sb.id).await.unwrap().unwrap();
    assert_eq!(got.ingress, sb.ingress);
    let wanted = ember_control::model::Ingress {
        public: false,
        auto_resume: true,
    };
    assert!(store.set_ingress(&t.id, &sb.id, &wanted).await.unwrap());
    assert!(
        !store
            .set_ingress("team-other", &sb.id, &wanted)
            .await
            .unwrap()
    );
    let got = store.sandbox(None, &sb.id).await.unwrap().unwrap();
    assert_eq!(got.ingress, wanted);
}

async fn a_state_transition_has_exactly_one_winner(url: &str) {
    let store = open(url).await;
    let t = team(&store, "a").await;
    let h = host(&store, "host-a").await;
    for _round in 0..3 {
        let sb = sandbox(&t.id, &h.id, SandboxState::Running, now_ms());
        assert!(store.insert_sandbox(&sb, None).await.unwrap());
        let mut tasks = Vec::new();
        for i in 0..16 {
            let store = store.clone();
            let id = sb.id.clone();
            let team_id = t.id.clone();
            // Half try to pause, half to destroy: one transition out of running wins.
            let to = if i % 2 == 0 {
                SandboxState::Pausing
            } else {
                SandboxState::Destroying
            };
            tasks.push(tokio::spawn(async move {
                let won = store
                    .transition(
                        Some(&team_id),
                        &id,
                        &[SandboxState::Running],
                        to,
                        &Changes::default(),
                        now_ms(),
                        None,
                    )
                    .await
                    .unwrap();
                won.then_some(to)
            }));
        }
        let mut winners = Vec::new();
        for t in tasks {
            if let Some(to) = t.await.unwrap() {
                winners.push(to);
            }
        }
        assert_eq!(winners.len(), 1, "{winners:?}");
        let row = store.sandbox(Some(&t.id), &sb.id).await.unwrap().unwrap();
        assert_eq!(row.state, winners[0]);
    }
}

async fn concurrent_placements_never_overcommit_a_host(url: &str) {
    let store = open(url).await;
    let t = team(&store, "a").await;
    let h = host(&store, "host-a").await;
    let cap = Arc::new(CapacityCheck {
        host_id: h.id.clone(),
        vcpus_total: 4,
        memory_mib_total: 8192,
        team_id: t.id.clone(),
        quota: TeamQuota::default(),
    });
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let store = store.clone();
        let cap = cap.clone();
        let sb = sandbox(&t.id, &h.id, SandboxState::Creating, now_ms());
        tasks.push(tokio::spawn(async move {
            store.insert_sandbox(&sb, Some(&cap)).await.unwrap()
        }));
    }
    let mut placed = 0;
    for t in tasks {
        placed += usize::from(t.await.unwrap());
    }
    assert_eq!(
        placed, 4,
        "a 4-vCPU host takes exactly four 1-vCPU sandboxes"
    );
    let usage = store.host_usage().await.unwrap();
    assert_eq!(usage[&h.id].vcpus, 4);

    // Paused sandboxes free their share; resuming one re-checks capacity.
    let rows = store
        .list_sandboxes(&t.id, &SandboxFilter::default(), None, 100)
        .await
        .unwrap();
    let first = &rows[0].id;
    for st in [
        SandboxState::Running,
        SandboxState::Pausing,
        SandboxState::Paused,
    ] {
        let from = match st {
            SandboxState::Running => SandboxState::Creating,
            SandboxState::Pausing => SandboxState::Running,
            _ => SandboxState::Pausing,
        };
        assert!(
            store
                .transition(
                    None,
                    first,
                    &[from],
                    st,
                    &Changes::default(),
                    now_ms(),
                    None
                )
                .await
                .unwrap()
        );
    }
    assert_eq!(store.host_usage().await.unwrap()[&h.id].vcpus, 3);
    let newcomer = sandbox(&t.id, &h.id, SandboxState::Creating, now_ms());
    assert!(store.insert_sandbox(&newcomer, Some(&cap)).await.unwrap());
    // Now full again: the paused one cannot resume.
    assert!(
        !store
            .transition(
                None,
                first,
                &[SandboxState::Paused],
                SandboxState::Resuming,
                &Changes::default(),
                now_ms(),
                Some(&cap)
            )
            .await
            .unwrap()
    );
    assert_eq!(
        store.sandbox(None, first).await.unwrap().unwrap().state,
        SandboxState::Paused
    );
}

async fn concurrent_placements_never_overrun_a_team_quota(url: &str) {
    let store = open(url).await;
    let a = team(&store, "a").await;
    let b = team(&store, "b").await;
    let h1 = host(&store, "host-1").await;
    let h2 = host(&store, "host-2").await;
    // Roomy hosts; team a may run 3 sandboxes of 1 vCPU and 512 MiB each.
    let quota = TeamQuota {
        running_sandboxes: Some(3),
        vcpus: Some(8),
        memory_mib: Some(4096),
        paused_sandboxes: None,
        templates: None,
        storage_mib: None,
    };
    let cap = |host: &str, team: &str| CapacityCheck {
        host_id: host.into(),
        vcpus_total: 64,
        memory_mib_total: 65536,
        team_id: team.into(),
        quota,
    };
    let mut tasks = Vec::new();
    for i in 0..12 {
        let store = store.clone();
        let host = if i % 2 == 0 { &h1.id } else { &h2.id };
        let c = cap(host, &a.id);
        let sb = sandbox(&a.id, host, SandboxState::Creating, now_ms());
        tasks.push(tokio::spawn(async move {
            store.insert_sandbox(&sb, Some(&c)).await.unwrap()
        }));
    }
    let mut placed = 0;
    for t in tasks {
        placed += usize::from(t.await.unwrap());
    }
    assert_eq!(placed, 3, "across two hosts, the team's 3 and no more");
    assert_eq!(
        store.team_usage(&a.id).await.unwrap(),
        TeamUsage {
            running_sandboxes: 3,
            vcpus: 3,
            memory_mib: 1536,
            paused_sandboxes: 0,
            templates: 0,
            storage_bytes: 0,
        }
    );
    // Another team is not held back by a's use.
    let other = sandbox(&b.id, &h1.id, SandboxState::Creating, now_ms());
    assert!(
        store
            .insert_sandbox(&other, Some(&cap(&h1.id, &b.id)))
            .await
            .unwrap()
    );

    // Memory is a limit of its own; a paused sandbox frees its share, and a
    // resume is checked like a create.
    let rows = store
        .list_sandboxes(&a.id, &SandboxFilter::default(), None, 100)
        .await
        .unwrap();
    let first = &rows[0].id;
    assert!(
        store
            .transition(
                None,
                first,
                &[SandboxState::Creating],
                SandboxState::Paused,
                &Changes::default(),
                now_ms(),
                None
            )
            .await
            .unwrap()
    );
    assert_eq!(store.team_usage(&a.id).await.unwrap().paused_sandboxes, 1);
    let mut big = sandbox(&a.id, &h1.id, SandboxState::Creating, now_ms());
    big.memory_mib = 4096;
    assert!(
        !store
            .insert_sandbox(&big, Some(&cap(&h1.id, &a.id)))
            .await
            .unwrap(),
        "over memory_mib"
    );
    let small = sandbox(&a.id, &h1.id, SandboxState::Creating, now_ms());
    assert!(
        store
            .insert_sandbox(&small, Some(&cap(&h1.id, &a.id)))
            .await
            .unwrap()
    );
    assert!(
        !store
            .transition(
                None,
                first,
                &[SandboxState::Paused],
                SandboxState::Resuming,
                &Changes::default(),
                now_ms(),
                Some(&cap(&h1.id, &a.id))
            )
            .await
            .unwrap(),
        "the resume would be the team's 4th"
    );
    let unlimited = CapacityCheck {
        quota: TeamQuota::default(),
        ..cap(&h1.id, &a.id)
    };
    assert!(
        store
            .transition(
                None,
                first,
                &[SandboxState::Paused],
                SandboxState::Resuming,
                &Changes::default(),
                now_ms(),
                Some(&unlimited)
            )
            .await
            .unwrap()
    );
}

async fn every_query_is_scoped_by_team(url: &str) {
    let store = open(url).await;
    let a = team(&store, "a").await;
    let b = team(&store, "b").await;
    let h = host(&store, "host-a").await;
    let mut sb = sandbox(&a.id, &h.id, SandboxState::Running, now_ms());
    sb.metadata.insert("owner".into(), "alice".into());
    assert!(store.insert_sandbox(&sb, None).await.unwrap());

    assert!(store.sandbox(Some(&b.id), &sb.id).await.unwrap().is_none());
    assert!(store.sandbox(Some(&a.id), &sb.id).await.unwrap().is_some());
    let mut f = SandboxFilter::default();
    assert!(
        store
            .list_sandboxes(&b.id, &f, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    f.metadata.insert("owner".into(), "alice".into());
    assert!(
        store
            .list_sandboxes(&b.id, &f, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .list_sandboxes(&a.id, &f, None, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(
        !store
            .transition(
                Some(&b.id),
                &sb.id,
                &[SandboxState::Running],
                SandboxState::Destroying,
                &Changes::default(),
                now_ms(),
                None
            )
            .await
            .unwrap()
    );
    assert!(
        !store
            .set_expiry(Some(&b.id), &sb.id, now_ms(), false)
            .await
            .unwrap()
    );
    assert!(!store.set_timeout(&b.id, &sb.id, 5).await.unwrap());
    assert_eq!(
        store.sandbox(None, &sb.id).await.unwrap().unwrap().state,
        SandboxState::Running
    );

    let bl = build(&a.id, &h.id, BuildKind::Template);
    assert!(
        store
            .insert_template(&bl, &template(&a.id, "py", &bl))
            .await
            .unwrap()
    );
    assert!(store.template(&b.id, "py").await.unwrap().is_none());
    assert!(store.list_templates(&b.id).await.unwrap().is_empty());
    assert!(
        store
            .delete_template(&b.id, "py", now_ms())
            .await
            .unwrap()
            .is_none()
    );
    assert!(store.template(&a.id, "py").await.unwrap().is_some());

    let (_, key) =
        ember_control::api::mint_key(&store, &a.id, "k", ember_control::auth::Role::Member)
            .await
            .unwrap();
    assert!(store.list_keys(&b.id).await.unwrap().is_empty());
    assert!(
        !store
            .revoke_key(Some(&b.id), &key.prefix, now_ms())
            .await
            .unwrap()
    );
    assert!(
        store
            .key(&key.prefix)
            .await
            .unwrap()
            .unwrap()
            .revoked_at
            .is_none()
    );
    assert!(
        store
            .revoke_key(Some(&a.id), &key.prefix, now_ms())
            .await
            .unwrap()
    );
    assert!(
        !store
            .revoke_key(Some(&a.id), &key.prefix, now_ms())
            .await
            .unwrap(),
        "revoking twice"
    );
}

async fn api_keys_are_stored_only_as_hashes(url: &str) {
    let store = open(url).await;
    let a = team(&store, "a").await;
    let mut keys = Vec::new();
    for i in 0..3 {
        keys.push(
            ember_control::api::mint_key(
                &store,
                &a.id,
                &format!("k{i}"),
                ember_control::auth::Role::Member,
            )
            .await
            .unwrap(),
        );
    }
    let cells = store
        .fetch_all_text("SELECT * FROM api_keys")
        .await
        .unwrap();
    assert_eq!(cells.len(), 3);
    let secret_parts: Vec<&str> = keys
        .iter()
        .map(|(k, _)| k.rsplit('_').next().unwrap())
        .collect();
    for row in &cells {
        for cell in row.iter().flatten() {
            for ((key, _), secret) in keys.iter().zip(&secret_parts) {
                assert!(!cell.contains(key.as_str()), "raw key stored: {cell}");
                assert!(!cell.contains(secret), "key secret stored: {cell}");
            }
        }
    }
    for (key, row) in &keys {
        let stored = store.key(&row.prefix).await.unwrap().unwrap();
        assert!(ember_control::auth::digest_matches(
            key,
            &stored.secret_sha256
        ));
        assert_eq!(stored.team_id, a.id);
    }
}

async fn template_names_are_unique_per_team(url: &str) {
    let store = open(url).await;
    let a = team(&store, "a").await;
    let b = team(&store, "b").await;
    let h = host(&store, "host-a").await;
    let b1 = build(&a.id, &h.id, BuildKind::Template);
    assert!(
        store
            .insert_template(&b1, &template(&a.id, "py", &b1))
            .await
            .unwrap()
    );
    let b2 = build(&a.id, &h.id, BuildKind::Template);
    assert!(
        !store
            .insert_template(&b2, &template(&a.id, "py", &b2))
            .await
            .unwrap()
    );
    assert!(
        store.build(&b2.id).await.unwrap().is_none(),
        "the loser's build row is rolled back"
    );
    let b3 = build(&b.id, &h.id, BuildKind::Template);
    assert!(
        store
            .insert_template(&b3, &template(&b.id, "py", &b3))
            .await
            .unwrap()
    );
    // Deleting frees the name at once.
    let gone = store
        .delete_template(&a.id, "py", now_ms())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(gone.build_id, b1.id);
    assert!(
        store
            .build(&b1.id)
            .await
            .unwrap()
            .unwrap()
            .released_at
            .is_some()
    );
    let b4 = build(&a.id, &h.id, BuildKind::Template);
    assert!(
        store
            .insert_template(&b4, &template(&a.id, "py", &b4))
            .await
            .unwrap()
    );
    assert_eq!(
        store.template(&a.id, "py").await.unwrap().unwrap().build_id,
        b4.id
    );
}

async fn build_references_count_templates_and_live_sandboxes(url: &str) {
    let store = open(url).await;
    let a = team(&store, "a").await;
    let h = host(&store, "host-a").await;
    let bl = build(&a.id, &h.id, BuildKind::Template);
    assert!(
        store
            .insert_template(&bl, &template(&a.id, "py", &bl))
            .await
            .unwrap()
    );
    assert_eq!(store.build_references(&bl.id).await.unwrap(), 1);
    let mut from = Vec::new();
    for _ in 0..2 {
        let mut sb = sandbox(&a.id, &h.id, SandboxState::Running, now_ms());
        sb.source_build_id = Some(bl.id.clone());
        sb.template = "py".into();
        assert!(store.insert_sandbox(&sb, None).await.unwrap());
        from.push(sb);
    }
    assert_eq!(store.build_references(&bl.id).await.unwrap(), 3);
    // A paused sandbox's own build counts too.
    let pause = build(&a.id, &h.id, BuildKind::Pause);
    store.insert_build(&pause).await.unwrap();
    store.insert_build(&pause).await.unwrap(); // idempotent
    let changes = Changes {
        build_id: Some(pause.id.clone()),
        ..Changes::default()
    };
    assert!(
        store
            .transition(
                None,
                &from[0].id,
                &[SandboxState::Running],
                SandboxState::Paused,
                &changes,
                now_ms(),
                None
            )
            .await
            .unwrap()
    );
    assert_eq!(store.build_references(&pause.id).await.unwrap(), 1);
    let destroyed = Changes {
        destroyed_at: Some(now_ms()),
        ..Changes::default()
    };
    assert!(
        store
            .transition(
                None,
                &from[1].id,
                &[SandboxState::Running],
                SandboxState::Destroyed,
                &destroyed,
                now_ms(),
                None
            )
            .await
            .unwrap()
    );
    assert_eq!(store.build_references(&bl.id).await.unwrap(), 2);
    store
        .delete_template(&a.id, "py", now_ms())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store.build_references(&bl.id).await.unwrap(),
        1,
        "the paused sandbox still depends on it"
    );
    // A build that something names cannot vanish from under it.
    assert!(sqlx_delete_build(&store, &bl.id).await.is_err());
}

async fn sqlx_delete_build(store: &Store, id: &str) -> Result<(), ()> {
    store
        .fetch_all_text(&format!("DELETE FROM builds WHERE id = '{id}'"))
        .await
        .map(|_| ())
        .map_err(|_| ())
}

async fn listing_paginates_and_filters(url: &str) {
    let store = open(url).await;
    let a = team(&store, "a").await;
    let h = host(&store, "host-a").await;
    let base = now_ms() - 100_000;
    let mut all = Vec::new();
    for i in 0..25i64 {
        let state = match i % 5 {
            0 => SandboxState::Paused,
            4 => SandboxState::Destroyed,
            _ => SandboxState::Running,
        };
        // Pairs share a timestamp so the ID tie-break is exercised.
        let mut sb = sandbox(&a.id, &h.id, state, base + i / 2);
        if state == SandboxState::Destroyed {
            sb.destroyed_at = Some(base);
        }
        sb.metadata.insert(
            "parity".into(),
            if i % 2 == 0 { "even" } else { "odd" }.into(),
        );
        sb.metadata.insert("n".into(), i.to_string());
        if i % 3 == 0 {
            sb.template = "py".into();
        }
        assert!(store.insert_sandbox(&sb, None).await.unwrap());
        all.push(sb);
    }
    let visible: Vec<&Sandbox> = all
        .iter()
        .filter(|s| s.state != SandboxState::Destroyed)
        .collect();
    let mut seen = Vec::new();
    let mut after: Option<PageAfter> = None;
    loop {
        let page = store
            .list_sandboxes(&a.id, &SandboxFilter::default(), after.as_ref(), 7)
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        let last = page.last().unwrap();
        after = Some(PageAfter {
            created_at: last.created_at,
            id: last.id.clone(),
        });
        seen.extend(page);
    }
    assert_eq!(seen.len(), visible.len());
    for w in seen.windows(2) {
        assert!(
            (w[0].created_at, &w[0].id) > (w[1].created_at, &w[1].id),
            "newest first, no repeats"
        );
    }

    let by = |f: SandboxFilter| {
        let store = store.clone();
        let team = a.id.clone();
        async move { store.list_sandboxes(&team, &f, None, 100).await.unwrap() }
    };
    let paused = by(SandboxFilter {
        states: vec![SandboxState::Paused],
        ..Default::default()
    })
    .await;
    assert_eq!(paused.len(), 5);
    assert!(paused.iter().all(|s| s.state == SandboxState::Paused));
    let destroyed = by(SandboxFilter {
        states: vec![SandboxState::Destroyed],
        ..Default::default()
    })
    .await;
    assert_eq!(destroyed.len(), 5);
    let mut f = SandboxFilter::default();
    f.metadata.insert("parity".into(), "even".into());
    let even = by(f.clone()).await;
    assert_eq!(
        even.len(),
        visible
            .iter()
            .filter(|s| s.metadata["parity"] == "even")
            .count()
    );
    f.metadata.insert("n".into(), "6".into());
    let six = by(f).await;
    assert_eq!(six.len(), 1);
    assert_eq!(six[0].metadata["n"], "6");
    let py = by(SandboxFilter {
        template: Some("py".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(
        py.len(),
        visible.iter().filter(|s| s.template == "py").count()
    );
    assert!(py.iter().all(|s| s.template == "py"));
    // A filter value that looks like SQL is only a value.
    let mut evil = SandboxFilter::default();
    evil.metadata.insert("parity".into(), "' OR '1'='1".into());
    assert!(by(evil).await.is_empty());
    // Round trip of every stored field.
    let one = store
        .sandbox(Some(&a.id), &all[3].id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(one, all[3]);
}

async fn expiry_and_purge(url: &str) {
    let store = open(url).await;
    let a = team(&store, "a").await;
    let h = host(&store, "host-a").await;
    let now = now_ms();
    let mut due = sandbox(&a.id, &h.id, SandboxState::Running, now);
    due.expires_at = Some(now - 1);
    let mut later = sandbox(&a.id, &h.id, SandboxState::Running, now);
    later.expires_at = Some(now + 60_000);
    let mut paused = sandbox(&a.id, &h.id, SandboxState::Paused, now);
    paused.expires_at = Some(now - 1);
    for s in [&due, &later, &paused] {
        assert!(store.insert_sandbox(s, None).await.unwrap());
    }
    let expired = store.expired_sandboxes(now, 10).await.unwrap();
    assert_eq!(
        expired.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        vec![due.id.as_str()]
    );
    // Extending never shortens.
    assert!(
        !store
            .set_expiry(None, &later.id, now + 1_000, true)
            .await
            .unwrap()
    );
    assert!(
        store
            .set_expiry(None, &later.id, now + 120_000, true)
            .await
            .unwrap()
    );
    assert_eq!(
        store
            .sandbox(None, &later.id)
            .await
            .unwrap()
            .unwrap()
            .expires_at,
        Some(now + 120_000)
    );
    assert!(
        !store
            .set_expiry(None, &paused.id, now + 120_000, false)
            .await
            .unwrap(),
        "only running sandboxes expire"
    );

    let gone = Changes {
        destroyed_at: Some(now - 10_000),
        ..Changes::default()
    };
    assert!(
        store
            .transition(
                None,
                &due.id,
                &[SandboxState::Running],
                SandboxState::Destroyed,
                &gone,
                now,
                None
            )
            .await
            .unwrap()
    );
    assert_eq!(
        store
            .sandboxes_on_host(&h.id, now - 20_000)
            .await
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        store
            .sandboxes_on_host(&h.id, now - 5_000)
            .await
            .unwrap()
            .len(),
        2
    );
    assert_eq!(store.purge_destroyed(now - 20_000).await.unwrap(), 0);
    assert_eq!(store.purge_destroyed(now).await.unwrap(), 1);
    assert!(store.sandbox(None, &due.id).await.unwrap().is_none());
    let counts = store.count_by_state().await.unwrap();
    assert_eq!(
        counts
            .iter()
            .find(|(s, _)| *s == SandboxState::Running)
            .map(|c| c.1),
        Some(1)
    );
}

async fn concurrent_first_starts_agree_on_one_setting(url: &str) {
    let store = open(url).await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .setting_or_insert("join_token", &format!("t{i}"))
                .await
                .unwrap()
        }));
    }
    let mut values = Vec::new();
    for t in tasks {
        values.push(t.await.unwrap());
    }
    values.dedup();
    assert_eq!(values.len(), 1, "{values:?}");
    store.put_setting("join_token", "new").await.unwrap();
    assert_eq!(
        store.setting("join_token").await.unwrap().as_deref(),
        Some("new")
    );
}

async fn template_builds_keep_progress_and_orphans_fail(url: &str) {
    let store = open(url).await;
    let a = team(&store, "a").await;
    let b = team(&store, "b").await;
    let now = now_ms();
    let mut job = TemplateBuild {
        id: format!("tb-{}", now),
        team_id: a.id.clone(),
        name: "web".into(),
        status: "running".into(),
        source: "Dockerfile".into(),
        step: 1,
        steps_total: 4,
        step_text: "FROM base".into(),
        error: None,
        log: "step 1/4: FROM base\n".into(),
        log_dropped: 0,
        sandbox_id: None,
        cached_steps: 0,
        created_at: now,
        heartbeat_at: now,
        finished_at: None,
    };
    store.insert_template_build(&job).await.unwrap();
    job.step = 2;
    job.log.push_str("it's \"quoted\" ü\n");
    job.log_dropped = 7;
    job.sandbox_id = Some("sb-1".into());
    store.update_template_build(&job).await.unwrap();
    assert_eq!(
        store.template_build(&a.id, &job.id).await.unwrap(),
        Some(job.clone())
    );
    assert_eq!(
        store.template_build(&b.id, &job.id).await.unwrap(),
        None,
        "another team's build"
    );
    assert_eq!(
        store
            .list_template_builds(&a.id, Some("web"), 10)
            .await
            .unwrap(),
        vec![job.clone()]
    );
    assert!(
        store
            .list_template_builds(&a.id, Some("other"), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .list_template_builds(&a.id, None, 10)
            .await
            .unwrap()
            .len(),
        1
    );

    // A live heartbeat keeps it running; a stale one fails it, once.
    assert_eq!(
        store
            .fail_orphaned_template_builds(now - 60_000, now)
            .await
            .unwrap(),
        0
    );
    store
        .heartbeat_template_build(&job.id, now - 120_000)
        .await
        .unwrap();
    assert_eq!(
        store
            .fail_orphaned_template_builds(now - 60_000, now)
            .await
            .unwrap(),
        1
    );
    let failed = store.template_build(&a.id, &job.id).await.unwrap().unwrap();
    assert_eq!(failed.status, "failed");
    assert!(failed.error.unwrap().contains("control plane"));
    assert_eq!(failed.finished_at, Some(now));
    assert_eq!(
        store.fail_orphaned_template_builds(now, now).await.unwrap(),
        0
    );
}
