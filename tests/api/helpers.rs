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

    /// Another handle on an existing database (a second replica): never drops it.
    pub fn shared(url: &str) -> Self {
        TestDb {
            url: url.to_owned(),
            pg_name: None,
            _dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn shared_dir(_dir: PathBuf) -> Self {
        TestDb::shared("")
    }

    /// Takes this PostgreSQL database away from its clients: new connections refused, open ones ended.
    pub async fn take_down(&self) -> PgOutage {
        let name = self.url.rsplit('/').next().unwrap_or_default().to_owned();
        let admin = Store::connect(&pg_admin_url(), 1)
            .await
            .expect("admin connection");
        sqlx::query(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"))
            .execute(admin.pool())
            .await
            .expect("refuse connections");
        sqlx::query(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
        ))
        .execute(admin.pool())
        .await
        .expect("end connections");
        PgOutage { admin, name }
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

/// A database taken down by [`TestDb::take_down`].
pub struct PgOutage {
    admin: Store,
    name: String,
}

impl PgOutage {
    /// Lets clients connect again.
    pub async fn end(self) {
        sqlx::query(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS true",
            self.name
        ))
        .execute(self.admin.pool())
        .await
        .expect("allow connections");
        self.admin.close().await;
    }
}

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub store: Store,
    pub state: exotel_sos::app::AppState,
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

/// For tests that watch queued deliveries themselves: no dispatcher in the app.
pub fn without_dispatcher() -> (&'static str, String) {
    ("SOS_DISPATCH__ENABLED", "false".into())
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
    serve(db, stakeholders, app).await
}

/// Serves an app built by the test itself (for example with an extra provider registered).
pub async fn serve(db: TestDb, stakeholders: PathBuf, app: App) -> TestApp {
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

    /// Stops the server, waits for it to finish, and hands back the database (dropped with it).
    pub async fn stop(mut self) -> TestDb {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            let _ = tokio::time::timeout(Duration::from_secs(20), h).await;
        }
        let dir = self.db.dir();
        std::mem::replace(&mut self.db, TestDb::shared_dir(dir))
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

/// Stand-ins for Exotel and GupShup, and the settings that make every channel live against them.
pub struct Providers {
    pub exotel: wiremock::MockServer,
    pub gupshup: wiremock::MockServer,
    /// Numbers (digits, as GupShup's `phone_number`) whose `OPT_IN` the GupShup stand-in refuses.
    pub refuse_opt_in: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// GupShup's answer to `OPT_IN`: success, or error 105 for the numbers listed.
struct OptInAnswers(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl wiremock::Respond for OptInAnswers {
    fn respond(&self, req: &wiremock::Request) -> wiremock::ResponseTemplate {
        let form: Vec<(String, String)> =
            serde_urlencoded::from_bytes(&req.body).unwrap_or_default();
        let phone = field(&form, "phone_number").unwrap_or_default().to_owned();
        let body = if self.0.lock().unwrap().contains(&phone) {
            serde_json::json!({"response": {"id": "105", "phone": "",
                "details": format!("The phone number \"{phone}\" is not a valid phone number"), "status": "error"}})
        } else {
            serde_json::json!({"response": {"id": "", "phone": phone, "details": "", "status": "success"}})
        };
        wiremock::ResponseTemplate::new(200).set_body_json(body)
    }
}

pub const ACCOUNT: &str = "acme";
pub const CALLS_PATH: &str = "/v1/Accounts/acme/Calls/connect.json";
pub const SMS_PATH: &str = "/v1/Accounts/acme/Sms/send.json";
pub const GUPSHUP_PATH: &str = "/GatewayAPI/rest";

impl Providers {
    /// The GupShup stand-in answers every `OPT_IN` at once (before any mock a test mounts).
    pub async fn start() -> Self {
        let p = Providers {
            exotel: wiremock::MockServer::start().await,
            gupshup: wiremock::MockServer::start().await,
            refuse_opt_in: Default::default(),
        };
        wiremock::Mock::given(wiremock::matchers::method("POST"))
            .and(wiremock::matchers::path(GUPSHUP_PATH))
            .and(wiremock::matchers::body_string_contains("method=OPT_IN"))
            .respond_with(OptInAnswers(p.refuse_opt_in.clone()))
            .with_priority(1)
            .mount(&p.gupshup)
            .await;
        p
    }

    /// The numbers GupShup was asked to opt in, in order.
    pub async fn opt_ins(&self) -> Vec<String> {
        self.gupshup
            .received_requests()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter_map(|r| {
                let form: Vec<(String, String)> =
                    serde_urlencoded::from_bytes(&r.body).unwrap_or_default();
                (field(&form, "method") == Some("OPT_IN"))
                    .then(|| field(&form, "phone_number").unwrap_or_default().to_owned())
            })
            .collect()
    }

    /// Live credentials pointing at the stand-ins, and fast retries so tests do not wait.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("SOS_EXOTEL__BASE_URL", self.exotel.uri()),
            ("SOS_EXOTEL__ACCOUNT_SID", ACCOUNT.into()),
            ("SOS_EXOTEL__API_KEY", "key123".into()),
            ("SOS_EXOTEL__API_TOKEN", "tok456".into()),
            ("SOS_EXOTEL__CALLER_ID", "08069891522".into()),
            (
                "SOS_EXOTEL__FLOW_URL",
                "http://my.exotel.com/acme/exoml/start_voice/926".into(),
            ),
            ("SOS_EXOTEL__SMS_FROM", "HOSPTL".into()),
            ("SOS_EXOTEL__DLT_ENTITY_ID", "1101000000000000001".into()),
            ("SOS_EXOTEL__DLT_TEMPLATE_ID", "1107000000000000002".into()),
            (
                "SOS_GUPSHUP__BASE_URL",
                format!("{}{GUPSHUP_PATH}", self.gupshup.uri()),
            ),
            ("SOS_GUPSHUP__USERID", "2000123456".into()),
            ("SOS_GUPSHUP__PASSWORD", "gs-secret".into()),
            ("SOS_DISPATCH__RETRY_SCHEDULE_SECS", "0.05, 0.1".into()),
            // Attempts alone bound retries here; the outage tests set a time budget themselves.
            ("SOS_DISPATCH__RETRY_FOR", "0s".into()),
            ("SOS_DISPATCH__POLL_INTERVAL_MS", "50".into()),
            // Live credentials would turn proxy mode on, and no test may fetch from Exotel's real
            // recording host: recordings are passed on as they are unless a test (the recordings
            // suite, with its own stand-in) turns proxy mode on.
            ("SOS_RECORDINGS__MODE", "direct".into()),
        ]
    }

    /// Requests the stand-ins received on `path`, as (form fields, request); GupShup opt-ins are left
    /// out (see [`Providers::opt_ins`]).
    pub async fn requests(&self, path: &str) -> Vec<(Vec<(String, String)>, wiremock::Request)> {
        let server = if path == GUPSHUP_PATH {
            &self.gupshup
        } else {
            &self.exotel
        };
        server
            .received_requests()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.url.path() == path)
            .map(|r| {
                let form: Vec<(String, String)> =
                    serde_urlencoded::from_bytes(&r.body).unwrap_or_default();
                (form, r)
            })
            .filter(|(form, _)| field(form, "method") != Some("OPT_IN"))
            .collect()
    }
}

pub fn field<'a>(form: &'a [(String, String)], key: &str) -> Option<&'a str> {
    form.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// Answers every request with a fresh provider id, as Exotel and GupShup do.
pub struct FreshIds {
    pub kind: &'static str,
    pub n: std::sync::atomic::AtomicUsize,
}

impl FreshIds {
    pub fn new(kind: &'static str) -> Self {
        FreshIds {
            kind,
            n: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

impl wiremock::Respond for FreshIds {
    fn respond(&self, _req: &wiremock::Request) -> wiremock::ResponseTemplate {
        let n = self.n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let body = match self.kind {
            "call" => {
                serde_json::json!({"Call": {"Sid": format!("call{n:028}k"), "Status": "in-progress",
                "To": null, "From": "+919800000001", "Direction": "outbound-api"}})
            }
            "sms" => {
                serde_json::json!({"SMSMessage": {"Sid": format!("sms{n:029}"), "Status": "queued",
                "DetailedStatusCode": 21010, "DetailedStatus": "PENDING_TO_OPERATOR"}})
            }
            _ => {
                serde_json::json!({"response": {"id": format!("4340925846643462{n:03}-31668054994359383"),
                "phone": "919800000001", "details": "", "status": "success"}})
            }
        };
        wiremock::ResponseTemplate::new(200).set_body_json(body)
    }
}

/// Mounts answering-at-once stand-ins for all three channels.
pub async fn mount_happy(p: &Providers) {
    use wiremock::matchers::{method, path};
    wiremock::Mock::given(method("POST"))
        .and(path(CALLS_PATH))
        .respond_with(FreshIds::new("call"))
        .mount(&p.exotel)
        .await;
    wiremock::Mock::given(method("POST"))
        .and(path(SMS_PATH))
        .respond_with(FreshIds::new("sms"))
        .mount(&p.exotel)
        .await;
    wiremock::Mock::given(method("POST"))
        .and(path(GUPSHUP_PATH))
        .respond_with(FreshIds::new("whatsapp"))
        .mount(&p.gupshup)
        .await;
}

impl TestApp {
    /// The incident's deliveries once every one has left `queued`/`sending`. The bound is generous: it
    /// only matters when something is wrong, and on a loaded two-core machine a burst of thirty
    /// incidents across two replicas (each claim of a call waiting for its number's lock) can take
    /// longer than twenty seconds to settle.
    pub async fn settled(&self, call_sid: &str) -> Vec<exotel_sos::store::DeliveryRow> {
        let store = self.store.clone();
        let sid = call_sid.to_owned();
        let ok = eventually(Duration::from_secs(60), || {
            let store = store.clone();
            let sid = sid.clone();
            async move {
                let Ok(Some(inc)) = store.incident_by_call_sid(&sid).await else {
                    return false;
                };
                let ds = store.deliveries(&inc.id).await.unwrap_or_default();
                !ds.is_empty()
                    && ds
                        .iter()
                        .all(|d| d.status != "queued" && d.status != "sending")
            }
        })
        .await;
        assert!(ok, "deliveries of {call_sid} did not settle");
        let inc = self
            .store
            .incident_by_call_sid(call_sid)
            .await
            .unwrap()
            .unwrap();
        self.store.deliveries(&inc.id).await.unwrap()
    }

    /// Polls the deliveries of the incident stored for `call_sid` until `check` holds or `timeout`
    /// passes; returns whether it held.
    pub async fn deliveries_until(
        &self,
        call_sid: &str,
        timeout: Duration,
        check: impl Fn(&[exotel_sos::store::DeliveryRow]) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(inc)) = self.store.incident_by_call_sid(call_sid).await {
                if let Ok(ds) = self.store.deliveries(&inc.id).await {
                    if check(&ds) {
                        return true;
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The deliveries of the incident stored for `call_sid`.
    pub async fn deliveries_of(&self, call_sid: &str) -> Vec<exotel_sos::store::DeliveryRow> {
        let inc = self
            .store
            .incident_by_call_sid(call_sid)
            .await
            .unwrap()
            .expect("incident stored");
        self.store.deliveries(&inc.id).await.unwrap()
    }

    /// The first delivery on `channel` of the incident stored for `call_sid`.
    pub async fn delivery_of(
        &self,
        call_sid: &str,
        channel: &str,
    ) -> exotel_sos::store::DeliveryRow {
        self.deliveries_of(call_sid)
            .await
            .into_iter()
            .find(|d| d.channel == channel)
            .expect("a delivery on that channel")
    }

    pub async fn post_json(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.client
            .post(format!("{}{path}?token={WEBHOOK_TOKEN}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn post_form(&self, path: &str, form: &[(&str, &str)]) -> reqwest::Response {
        self.client
            .post(format!("{}{path}?token={WEBHOOK_TOKEN}", self.base))
            .form(form)
            .send()
            .await
            .unwrap()
    }
}

/// A port nobody listens on right now (the server binds it itself, so a restart can reuse it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free port below the kernel's ephemeral range, for a server restarted on the same port: while it is
/// down, no outgoing connection can be given that port, nor connect to itself on it (a TCP self-connect
/// to a port with no listener would hold the port and keep the restart from binding it).
pub fn stable_port() -> u16 {
    use rand::Rng;
    let first_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let below = first_ephemeral.saturating_sub(10_000).max(1024)..first_ephemeral.max(1025);
    let mut rng = rand::thread_rng();
    for _ in 0..1000 {
        let port = rng.gen_range(below.clone());
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    free_port()
}

/// The release binary of this build, serving on `port`; killed (SIGKILL) and reaped when dropped, so a
/// failing test leaves no process behind.
pub struct Server {
    child: std::process::Child,
    pub port: u16,
}

/// Starts `exotel-sos serve` against `db_url` with live channels pointing at the stand-ins. Short
/// provider time limits and a short lease, so a killed process's work is picked up within seconds;
/// `extra` entries override them. With `SOS_TEST_SERVER_LOGS=DIR` its output is appended to
/// `DIR/server-PORT.log`; `SOS_TEST_SERVER_BIN=FILE` runs that binary instead of this build's.
pub fn spawn_server(
    db_url: &str,
    stakeholders: &std::path::Path,
    p: &Providers,
    port: u16,
    extra: &[(&str, String)],
) -> Server {
    spawn_server_logging(db_url, stakeholders, p, port, extra, None)
}

/// [`spawn_server`], with its output (the banner and every log line) written to `log` when given.
pub fn spawn_server_logging(
    db_url: &str,
    stakeholders: &std::path::Path,
    p: &Providers,
    port: u16,
    extra: &[(&str, String)],
    log: Option<&std::path::Path>,
) -> Server {
    use std::process::{Command, Stdio};
    // A copy can be named when the target directory is shared with builds of other source trees, which
    // may replace this build's binary while the tests run.
    let bin = std::env::var_os("SOS_TEST_SERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_exotel-sos")));
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .env("SOS_DATABASE__URL", db_url)
        .env("SOS_SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("SOS_SERVER__WEBHOOK_TOKEN", WEBHOOK_TOKEN)
        .env("SOS_SERVER__ADMIN_TOKEN", ADMIN_TOKEN)
        .env("SOS_STAKEHOLDERS__FILE", stakeholders)
        .env("SOS_EXOTEL__CALL_TIMEOUT_SECS", "2")
        .env("SOS_EXOTEL__SMS_TIMEOUT_SECS", "2")
        .env("SOS_GUPSHUP__TIMEOUT_SECS", "2")
        .env("SOS_DISPATCH__LEASE_SECS", "4");
    for (k, v) in p.env() {
        cmd.env(k, v);
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let log = log.map(PathBuf::from).or_else(|| {
        std::env::var_os("SOS_TEST_SERVER_LOGS")
            .map(|dir| PathBuf::from(dir).join(format!("server-{port}.log")))
    });
    match log {
        Some(file) => {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(file)
                .expect("server log file");
            cmd.stdout(log.try_clone().expect("log handle")).stderr(log);
        }
        None => {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
    }
    Server {
        child: cmd.spawn().expect("start the server"),
        port,
    }
}

impl Server {
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: no shutdown, no lease released. Waits until the process is gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process has ended by itself (for example a port not free yet).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Waits until `/healthz` answers 200; false if the process ended or `timeout` passed first.
    pub async fn healthy_within(&mut self, timeout: Duration) -> bool {
        let url = format!("{}/healthz", self.base());
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if self.exited() {
                return false;
            }
            if reqwest::get(&url).await.is_ok_and(|r| r.status() == 200) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }

    /// Waits until `/healthz` answers 200, or fails the test.
    pub async fn wait_healthy(&mut self) {
        assert!(
            self.healthy_within(Duration::from_secs(30)).await,
            "server on port {} came up",
            self.port
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}
