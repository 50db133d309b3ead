//! `runlane lanes list|add`.

use super::{emit, instant, Connection};
use crate::table::{opt, Table};

/// `runlane lanes …`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug, Clone)]
enum Command {
    /// Lists lanes with their depth and consumers.
    List,
    /// Adds a lane (admin).
    Add {
        /// The lane's name.
        name: String,
    },
}

/// Runs `runlane lanes …`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let client = args.conn.client()?;
    match args.command {
        Command::List => {
            let reply = client.list_lanes().await?;
            emit(args.conn.json, &reply.raw, || {
                let mut t = Table::new(&["NAME", "READY", "CONSUMERS", "ORPHAN_SINCE"]);
                for l in &reply.value.lanes {
                    t.row(vec![
                        l.name.clone(),
                        opt(l.ready),
                        opt(l.consumers),
                        if l.orphan_since_at_ms.is_some() {
                            instant(l.orphan_since_at_ms)
                        } else {
                            "-".into()
                        },
                    ]);
                }
                t.render()
            });
        }
        Command::Add { name } => {
            let reply = client.add_lane(&name).await?;
            emit(args.conn.json, &reply.raw, || {
                format!("lane {name} added\n")
            });
        }
    }
    Ok(())
}
