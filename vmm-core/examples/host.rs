//! A program that embeds vmm and adds a command of its own, `whoami`, without
//! any change to vmm-core: it is registered with `inventory::submit!` like the
//! built-in commands, and `help` lists it.
//!
//! ```text
//! DATABASE_URL=postgres://vmm:vmm@127.0.0.1:5432/vmm VMM_LISTEN=127.0.0.1:8888 \
//!     cargo run -p vmm-core --example host
//! printf '{"command":"whoami"}\n' | nc 127.0.0.1 8888
//! ```

use vmm_core::params::{self, Empty};
use vmm_core::{Command, Context, Data, HandlerFuture, Session, Success};

/// `whoami`: this connection's session as the server sees it.
///
/// ```text
/// -> {"command": "whoami", "data": {}}
/// <- {"status":"success","message":"session 3","data":{"session_id":3,"peer":"127.0.0.1:50000","vm_id":null,"authenticated":false}}
/// ```
fn whoami<'a>(_: &'a Context, session: &'a mut Session, data: Data) -> HandlerFuture<'a> {
    Box::pin(async move {
        params::parse::<Empty>(data)?;
        Success::new(format!("session {}", session.id()))
            .with("session_id", session.id())?
            .with("peer", session.peer().to_string())?
            .with("vm_id", session.vm_id())?
            .with("authenticated", session.authenticated_vm().is_some())
    })
}

vmm_core::inventory::submit! {
    Command { name: "whoami", summary: "show this connection's session (added by the example host)", handler: whoami }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let config = vmm_core::Config {
        database_url: std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| vmm_core::context::DEFAULT_DATABASE_URL.into()),
        ..vmm_core::Config::default()
    };
    let listen = std::env::var("VMM_LISTEN").unwrap_or_else(|_| "127.0.0.1:8888".into());
    let context = vmm_core::Context::connect(config).await?;
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    // The one line on stdout: where to connect (tests read it).
    println!("listening on {}", listener.local_addr()?);
    vmm_core::serve(listener, context, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
