//! Real databases for tests: a SQLite file in a temp dir, or a fresh
//! PostgreSQL database per test (created on the server named by
//! `EMBER_TEST_POSTGRES_URL`, dropped afterwards), so tests run in parallel.

#![allow(dead_code)]

use sqlx::Connection;

pub struct TestDb {
    pub url: String,
    pg: Option<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

pub const PG_ENV: &str = "EMBER_TEST_POSTGRES_URL";

impl TestDb {
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("control.db").display());
        TestDb {
            url,
            pg: None,
            _dir: Some(dir),
        }
    }

    /// A fresh database, or `None` when no PostgreSQL server is configured.
    pub async fn postgres() -> Option<TestDb> {
        let admin = std::env::var(PG_ENV).ok()?;
        sqlx::any::install_default_drivers();
        let name = format!("ember_t_{}", uuid_like());
        let mut conn = sqlx::AnyConnection::connect(&admin)
            .await
            .expect("connect to EMBER_TEST_POSTGRES_URL");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create test database");
        conn.close().await.ok();
        let base = admin
            .rsplit_once('/')
            .map(|(b, _)| b)
            .expect("URL has a database path");
        Some(TestDb {
            url: format!("{base}/{name}"),
            pg: Some((admin, name)),
            _dir: None,
        })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((admin, name)) = self.pg.take() else {
            return;
        };
        // Drop runs outside async context; a short-lived runtime does the SQL.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let mut conn = sqlx::AnyConnection::connect(&admin).await.ok()?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await
                    .ok()?;
                Some(())
            })
        })
        .join();
    }
}

pub fn uuid_like() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..16)
        .map(|_| (b'a' + rng.gen_range(0..26)) as char)
        .collect()
}

/// Generate a `sqlite` and a `postgres` test from one async fn taking `&str` (the URL).
#[macro_export]
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                let db = $crate::common::TestDb::sqlite();
                super::$name(&db.url).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                ember_testkit::require!(
                    std::env::var($crate::common::PG_ENV).is_ok(),
                    "needs PostgreSQL: run scripts/postgres-test-db and source target/postgres-test.env ({})",
                    $crate::common::PG_ENV
                );
                let db = $crate::common::TestDb::postgres().await.expect("postgres");
                super::$name(&db.url).await;
            }
        }
    )*};
}
