//! Test harness: the real app on a random port, a fresh SQLite file or PostgreSQL database per test.

use std::path::PathBuf;
use std::time::Duration;

use exotel_sos::settings::Settings;
use exotel_sos::store::Store;
use exotel_sos::App;

pub const WEBHOOK_TOKEN: &str = "test-webhook-token-0123456789";
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// Contacts: Asha (cardiology + desk, all channels), Vikram (neurology, all), Desk (desk, call+sms),
/// Lab (lab, sms+whatsapp).
pub const STAKEHOLDERS: &str = r#"
[[contact]]
name = "Dr. Asha Rao"
phone = "+91 98000 00001"
teams = ["cardiology", "emergency-desk"]

[[contact]]
name = "Dr. Vikram Iyer"
phone = "09800000002"
teams = ["neurology"]

[[contact]]
name = "Emergency desk"
phone = "+919800000004"
channels = ["call", "sms"]
teams = ["emergency-desk"]

[[contact]]
name = "Central lab"
phone = "+919800000005"
channels = ["sms", "whatsapp"]
teams = ["lab"]

[routes]
Heart = ["cardiology", "emergency-desk", "lab"]
Brain = ["neurology", "emergency-desk"]
default = ["emergency-desk"]

[ivr]
1 = "Heart"
2 = "Brain"
"#;

/// Deliveries per route with [`STAKEHOLDERS`]: Heart = Asha 3 + Desk 2 + Lab 2.
pub const HEART_DELIVERIES: usize = 7;
/// Brain = Vikram 3 + Asha 3 (via the desk team) + Desk 2.
pub const BRAIN_DELIVERIES: usize = 8;
/// default = Asha 3 + Desk 2.
pub const DEFAULT_DELIVERIES: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// Runs a test body once per engine, as two tests.
#[macro_export]
macro_rules! both_engines {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name($crate::helpers::Db::Sqlite).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$name($crate::helpers::Db::Postgres).await
                }
            }
        )*
    };
}

pub fn pg_admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database that exists for one test and is dropped after it.
pub struct TestDb {
    pub url: String,
    pg_name: Option<String>,
    _dir: tempfile::TempDir,
}

impl TestDb {
    pub async fn new(db: Db) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        match db {
            Db::Sqlite => TestDb {
                url: format!("sqlite://{}?mode=rwc", dir.path().join("sos.db").display()),
                pg_name: None,
                _dir: dir,
            },
            Db::Postgres => {
                let name = format!("sos_test_{}", uuid::Uuid::new_v4().simple());
                let admin = pg_admin_url();
                let store = Store::connect(&admin, 1)
                    .await
                    .expect("PostgreSQL is reachable");
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(store.pool())
                    .await
                    .expect("create test database");
                store.close().await;
                let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
                TestDb {
                    url: format!("{base}/{name}"),
                    pg_name: Some(name),
                    _dir: dir,
                }
            }
        }
    }

    pub fn dir(&self) -> PathBuf {
        self._dir.path().to_path_buf()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(name) = self.pg_name.take() {
            // Best effort, on its own runtime: Drop cannot await.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    if let Ok(store) = Store::connect(&pg_admin_url(), 1).await {
                        let _ =
                            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                                .execute(store.pool())
                                .await;
                        store.close().await;
                    }
                });
            })
            .join();
        }
    }
}

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub store: Store,
    pub state: exotel_sos::http::AppState,
    pub stakeholders: PathBuf,
    pub db: TestDb,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Settings for a test app: `extra` environment entries override the defaults given here.
pub fn test_settings(
    db: &TestDb,
    stakeholders: &std::path::Path,
    extra: &[(&str, String)],
) -> Settings {
    let mut env: Vec<(String, String)> = vec![
        ("SOS_DATABASE__URL".into(), db.url.clone()),
        ("SOS_DATABASE__MAX_CONNECTIONS".into(), "5".into()),
        ("SOS_SERVER__LISTEN".into(), "127.0.0.1:0".into()),
        ("SOS_SERVER__WEBHOOK_TOKEN".into(), WEBHOOK_TOKEN.into()),
        ("SOS_SERVER__ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
        (
            "SOS_STAKEHOLDERS__FILE".into(),
            stakeholders.display().to_string(),
        ),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    Settings::load_with_env(None, env).expect("test settings are valid")
}

pub async fn spawn_app(db: Db) -> TestApp {
    spawn_app_with(db, &[]).await
}

pub async fn spawn_app_with(db: Db, extra: &[(&str, String)]) -> TestApp {
    let db = TestDb::new(db).await;
    let stakeholders = db.dir().join("stakeholders.toml");
    std::fs::write(&stakeholders, STAKEHOLDERS).expect("write stakeholders");
    let settings = test_settings(&db, &stakeholders, extra);
    start(db, stakeholders, settings).await
}

pub async fn start(db: TestDb, stakeholders: PathBuf, settings: Settings) -> TestApp {
    let app = App::build(settings).await.expect("app builds");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let state = app.state.clone();
    let store = state.store.clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(app.run(listener, async move {
        let _ = rx.await;
    }));
    TestApp {
        base: format!("http://{addr}"),
        client: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client"),
        store,
        state,
        stakeholders,
        db,
        shutdown: Some(tx),
        handle: Some(handle),
    }
}

impl TestApp {
    /// GET /exotel/passthru with the right token and these raw query pairs.
    pub async fn passthru(&self, query: &str) -> reqwest::Response {
        self.client
            .get(format!(
                "{}/exotel/passthru?token={WEBHOOK_TOKEN}&{query}",
                self.base
            ))
            .send()
            .await
            .expect("passthru request")
    }

    pub async fn greeting(&self, method: reqwest::Method, reference: &str) -> reqwest::Response {
        self.client
            .request(
                method,
                format!(
                    "{}/exotel/greeting?token={WEBHOOK_TOKEN}&CustomField={reference}",
                    self.base
                ),
            )
            .send()
            .await
            .expect("greeting request")
    }

    /// Stops the server and waits for it to finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            let _ = tokio::time::timeout(Duration::from_secs(20), h).await;
        }
    }
}

/// Polls `check` until it holds or `timeout` passes; returns whether it held.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
