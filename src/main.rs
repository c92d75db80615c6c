use std::process::ExitCode;

use clap::Parser;
use ehrx::cli::{
    AuditCommand, BackupCommand, Cli, ClientCommand, Command, KeysCommand, SubscriberCommand,
    UserCommand,
};
use ehrx::config::{Config, LogFormat};
use ehrx::server::{shutdown_signal, Server};
use ehrx::store::Store;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(Some(&cli.config)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ehrx: {e}");
            return ExitCode::from(2);
        }
    };
    ehrx::limits::install(config.limits);
    init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ehrx: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli.command, config))
}

/// Log lines to standard error: plain text (coloured only on a terminal, and
/// not with `NO_COLOR` set) or JSON lines.
fn init_logging(config: &Config) {
    use std::io::IsTerminal as _;
    let filter = EnvFilter::try_new(&config.log).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Text => {
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            builder.with_ansi(colour).init()
        }
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}

async fn run(command: Command, config: Config) -> ExitCode {
    match command {
        Command::Backup {
            command: Some(BackupCommand::Verify { file }),
            ..
        } => {
            let checked = tokio::task::spawn_blocking(move || ehrx::backup::verify(&file)).await;
            print_json(
                "ehrx backup verify",
                match checked {
                    Ok(Ok(c)) => Ok(serde_json::json!({ "verified": c })),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(e) => Err(e.to_string()),
                },
            )
        }
        Command::Backup { out, .. } => {
            let Some(out) = out else {
                eprintln!("ehrx backup: --out FILE is required");
                return ExitCode::from(2);
            };
            let started = std::time::Instant::now();
            let result = async {
                let store = open_store(&config).await?;
                let done = ehrx::backup::write(&store, &out)
                    .await
                    .map_err(|e| e.to_string());
                store.close().await;
                done
            }
            .await;
            print_json(
                "ehrx backup",
                result.map(|c| {
                    serde_json::json!({
                        "written": c,
                        "seconds": started.elapsed().as_secs_f64(),
                    })
                }),
            )
        }
        Command::Restore { file } => {
            let started = std::time::Instant::now();
            let result = async {
                let store = config.open_store(2).await.map_err(|e| e.to_string())?;
                let done = ehrx::backup::restore(&store, &file)
                    .await
                    .map_err(|e| e.to_string());
                store.close().await;
                done
            }
            .await;
            print_json(
                "ehrx restore",
                result.map(|c| {
                    serde_json::json!({
                        "restored": c,
                        "seconds": started.elapsed().as_secs_f64(),
                    })
                }),
            )
        }
        Command::Serve => {
            let server = match Server::bind(config).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            if let Ok(addr) = server.local_addr() {
                tracing::info!(%addr, base = %server.state.env.base, "ehrx FHIR server listening");
            }
            match server.run(shutdown_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Migrate => match config.open_store(1).await {
            Ok(_) => {
                tracing::info!("database schema is up to date");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Reindex => {
            let store = match config.open_store(2).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let bar = indicatif::ProgressBar::new_spinner();
            let result = ehrx::store::reindex(&store, |n| {
                bar.set_message(format!("{n} resources reindexed"))
            })
            .await;
            bar.finish_and_clear();
            match result {
                Ok(n) => {
                    println!("reindexed {n} resources");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Explain { search } => {
            let result = async {
                let store = config
                    .open_store(1)
                    .await
                    .map_err(ehrx::error::Error::from)?;
                let env = ehrx::interaction::Env::from_config(&config);
                use ehrx::policy::{Access, Maintenance};
                let gate = store.gate(Access::maintenance(Maintenance::Explain));
                let mut r = gate.reader().await.map_err(ehrx::error::Error::from)?;
                ehrx::interaction::explain(&mut r.view(), store.dialect(), &env, &search).await
            }
            .await;
            match result {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ehrx explain: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Client(ClientCommand::Add {
            name,
            kind,
            redirect_uris,
            jwks_file,
            jwks_url,
            scope,
            organization,
            insurer_role,
        }) => {
            let result = async {
                let jwks = match jwks_file {
                    Some(f) => {
                        let text = std::fs::read_to_string(&f)
                            .map_err(|e| format!("{}: {e}", f.display()))?;
                        Some(
                            serde_json::from_str(&text)
                                .map_err(|e| format!("{}: {e}", f.display()))?,
                        )
                    }
                    None => None,
                };
                let store = open_store(&config).await?;
                let new = ehrx::auth::clients::NewClient {
                    name,
                    kind,
                    redirect_uris,
                    jwks,
                    jwks_url,
                    scope,
                    organization,
                    insurer_role,
                };
                ehrx::auth::clients::register(&store, &new)
                    .await
                    .map_err(|e| e.to_string())
            }
            .await;
            print_json(
                "ehrx client add",
                result.map(|(id, secret)| {
                    let mut out = serde_json::json!({ "client_id": id });
                    if let Some(s) = secret {
                        out["client_secret"] = serde_json::json!(s);
                    }
                    out
                }),
            )
        }
        Command::User(UserCommand::Add {
            username,
            password_stdin: _,
            fhir_user,
        }) => {
            let mut password = String::new();
            if let Err(e) = std::io::stdin().read_line(&mut password) {
                eprintln!("ehrx user add: cannot read the password: {e}");
                return ExitCode::FAILURE;
            }
            let password = password.trim_end_matches(['\n', '\r']);
            let result = async {
                let store = open_store(&config).await?;
                ehrx::auth::users::add(&store, &username, password, &fhir_user)
                    .await
                    .map_err(|e| e.to_string())
            }
            .await;
            print_json(
                "ehrx user add",
                result.map(|u| {
                    serde_json::json!({"id": u.id, "username": u.username, "fhirUser": u.fhir_user})
                }),
            )
        }
        Command::Client(ClientCommand::List) => {
            admin("ehrx client list", &config, |store| async move {
                Ok(serde_json::Value::Array(
                    ehrx::auth::clients::list(&store).await?,
                ))
            })
            .await
        }
        Command::Client(ClientCommand::Disable { client_id }) => switch(
            "ehrx client disable",
            &config,
            "client",
            client_id,
            |store, id| async move { ehrx::auth::clients::set_disabled(&store, &id, true).await },
        )
        .await,
        Command::Client(ClientCommand::Enable { client_id }) => switch(
            "ehrx client enable",
            &config,
            "client",
            client_id,
            |store, id| async move { ehrx::auth::clients::set_disabled(&store, &id, false).await },
        )
        .await,
        Command::User(UserCommand::List) => {
            admin("ehrx user list", &config, |store| async move {
                Ok(serde_json::Value::Array(
                    ehrx::auth::users::list(&store).await?,
                ))
            })
            .await
        }
        Command::User(UserCommand::Disable { user }) => {
            switch(
                "ehrx user disable",
                &config,
                "user",
                user,
                |store, id| async move { ehrx::auth::users::set_disabled(&store, &id, true).await },
            )
            .await
        }
        Command::User(UserCommand::Enable { user }) => switch(
            "ehrx user enable",
            &config,
            "user",
            user,
            |store, id| async move { ehrx::auth::users::set_disabled(&store, &id, false).await },
        )
        .await,
        Command::User(UserCommand::SetPassword {
            user,
            password_stdin: _,
        }) => {
            let mut password = String::new();
            if let Err(e) = std::io::stdin().read_line(&mut password) {
                eprintln!("ehrx user set-password: cannot read the password: {e}");
                return ExitCode::FAILURE;
            }
            let password = password.trim_end_matches(['\n', '\r']).to_string();
            switch("ehrx user set-password", &config, "user", user, |store, id| async move {
                ehrx::auth::users::set_password(&store, &id, &password).await
            }).await
        }
        Command::Keys(KeysCommand::Rotate) => {
            let result = async {
                let store = open_store(&config).await?;
                ehrx::auth::Keys::rotate(&store)
                    .await
                    .map_err(|e| e.to_string())
            }
            .await;
            print_json(
                "ehrx keys rotate",
                result.map(|kid| serde_json::json!({ "kid": kid })),
            )
        }
        Command::Keys(KeysCommand::Reseal { new_key_file }) => {
            let result = async {
                let new = match &new_key_file {
                    Some(path) => ehrx::store::secrets::Secrets::from_file(path)?,
                    None => ehrx::store::secrets::Secrets::default(),
                };
                let store = open_store(&config).await?;
                ehrx::store::secrets::reseal(&store, &new)
                    .await
                    .map_err(|e| e.to_string())
            }
            .await;
            print_json(
                "ehrx keys reseal",
                result.map(|n| serde_json::json!({ "keys": n, "sealed": new_key_file.is_some() })),
            )
        }
        Command::Launch { patient, encounter } => {
            let result = async {
                let store = open_store(&config).await?;
                ehrx::auth::mint_launch(&store, patient.as_deref(), encounter.as_deref())
                    .await
                    .map_err(|e| e.to_string())
            }
            .await;
            print_json(
                "ehrx launch",
                result.map(|id| serde_json::json!({ "launch": id })),
            )
        }
        Command::Import { paths, quiet } => {
            match ehrx::import::run(&config, &paths, !quiet).await {
                Ok(report) => {
                    print!("{}", report.summary());
                    if report.failed.is_empty() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("ehrx import: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Subscriber { command } => subscriber(command, &config).await,
        Command::Audit { command } => audit(command, &config).await,
        Command::ExchangeCert { ecdsa } => {
            let result = async {
                let store = config
                    .open_store(1)
                    .await
                    .map_err(ehrx::error::Error::from)?;
                ehrx::exchange::keys::exchange_key(&store)
                    .await
                    .map_err(ehrx::error::Error::from)
            }
            .await;
            match result {
                Ok(key) => {
                    let cert = if ecdsa { &key.ec_cert } else { &key.cert };
                    print!("{}", cert.to_pem());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ehrx exchange-cert: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn audit(command: AuditCommand, config: &Config) -> ExitCode {
    use ehrx::store::audit;
    let store = match config.open_store(1).await {
        Ok(s) => s,
        Err(e) => return print_json("ehrx audit", Err(e.to_string())),
    };
    let log = || {
        audit::AuditLog::start(
            store.clone(),
            config.base_url(),
            Default::default(),
            0,
            Default::default(),
        )
    };
    match command {
        AuditCommand::Verify { from_checkpoint } => {
            let extra = match from_checkpoint {
                Some(path) => match std::fs::read(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
                {
                    Ok(c) => Some(c),
                    Err(e) => {
                        return print_json(
                            "ehrx audit verify",
                            Err(format!("cannot read {}: {e}", path.display())),
                        )
                    }
                },
                None => None,
            };
            match audit::verify(&store, extra).await {
                Ok(report) => {
                    println!("{}", serde_json::to_string(&report).unwrap_or_default());
                    if report.verified {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => print_json("ehrx audit verify", Err(e.to_string())),
            }
        }
        AuditCommand::Export { since, out } => {
            let result = ehrx::audit_export::export(&log(), &since, out.as_deref()).await;
            print_json(
                "ehrx audit export",
                result.map(|n| serde_json::json!({ "exported": n })),
            )
        }
        AuditCommand::Checkpoint => print_json(
            "ehrx audit checkpoint",
            log()
                .checkpoint()
                .await
                .map(|c| c.map(|c| c.to_json()).unwrap_or_default())
                .map_err(|e| e.to_string()),
        ),
        AuditCommand::RotateKey => print_json(
            "ehrx audit rotate-key",
            audit::rotate_key(&store)
                .await
                .map(|id| serde_json::json!({ "key_id": id }))
                .map_err(|e| e.to_string()),
        ),
        AuditCommand::Prune { before } => {
            let cutoff = match before {
                Some(b) => b,
                None if config.audit_retention_days == 0 => {
                    return print_json(
                        "ehrx audit prune",
                        Err("audit_retention_days is 0: every entry is kept".into()),
                    );
                }
                None => audit::retention_cutoff(config.audit_retention_days),
            };
            print_json(
                "ehrx audit prune",
                audit::prune(&store, &cutoff)
                    .await
                    .map(|n| serde_json::json!({ "cleared": n, "before": cutoff }))
                    .map_err(|e| e.to_string()),
            )
        }
    }
}

async fn subscriber(command: SubscriberCommand, config: &Config) -> ExitCode {
    use ehrx::exchange::subscriber;
    let result = async {
        let store = config
            .open_store(1)
            .await
            .map_err(ehrx::error::Error::from)?;
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| {
                ehrx::error::Error::invalid(format!("cannot read {}: {e}", p.display()))
            })
        };
        match command {
            SubscriberCommand::Add {
                name,
                kind,
                cert,
                endpoint,
                require_mtls,
            } => {
                subscriber::add(
                    &store,
                    &name,
                    &kind,
                    &read(&cert)?,
                    endpoint.as_deref(),
                    require_mtls,
                )
                .await
            }
            SubscriberCommand::RequireMtls { organization, off } => {
                subscriber::require_mtls(&store, &organization, !off).await
            }
            SubscriberCommand::RotateCert { organization, cert } => {
                subscriber::rotate_cert(&store, &organization, &read(&cert)?).await
            }
            SubscriberCommand::RevokeCert { fingerprint } => {
                subscriber::revoke_cert(&store, &fingerprint).await
            }
            SubscriberCommand::List => subscriber::list(&store).await,
        }
    }
    .await;
    match result {
        Ok(v) => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ehrx subscriber: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The database for a one-shot command.
async fn open_store(config: &Config) -> Result<Store, String> {
    config.open_store(1).await.map_err(|e| e.to_string())
}

/// A command's JSON answer on stdout, or its error on stderr.
/// Runs an administrative command on the database and prints its JSON.
async fn admin<F, Fut>(command: &str, config: &Config, f: F) -> ExitCode
where
    F: FnOnce(Store) -> Fut,
    Fut: std::future::Future<Output = Result<serde_json::Value, ehrx::auth::AuthError>>,
{
    let result = async {
        let store = open_store(config).await?;
        f(store).await.map_err(|e| e.to_string())
    }
    .await;
    print_json(command, result)
}

/// Runs a command that changes one client or user (`what`, named `who`);
/// fails when there is none such.
async fn switch<F, Fut>(command: &str, config: &Config, what: &str, who: String, f: F) -> ExitCode
where
    F: FnOnce(Store, String) -> Fut,
    Fut: std::future::Future<Output = Result<bool, ehrx::auth::AuthError>>,
{
    let result = async {
        let store = open_store(config).await?;
        match f(store, who.clone()).await.map_err(|e| e.to_string())? {
            true => Ok(serde_json::json!({ what: who, "done": command.rsplit(' ').next() })),
            false => Err(format!("there is no {what} '{who}'")),
        }
    }
    .await;
    print_json(command, result)
}

fn print_json(command: &str, result: Result<serde_json::Value, String>) -> ExitCode {
    match result {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{command}: {e}");
            ExitCode::FAILURE
        }
    }
}
