//! `runlane schedules list`.

use super::{emit, instant, Connection};
use crate::client::Schedule;
use crate::table::{opt, Table};

/// `runlane schedules …`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug, Clone)]
enum Command {
    /// Lists the cron schedules of an env's current version with the next tick of each.
    List {
        /// The env.
        #[arg(long, env = "RUNLANE_ENV")]
        env: String,
    },
}

fn schedules_table(schedules: &[Schedule]) -> String {
    let mut t = Table::new(&[
        "TASK",
        "INDEX",
        "CRON",
        "TIMEZONE",
        "NEXT_TICK",
        "LAST_TICK",
    ]);
    for s in schedules {
        t.row(vec![
            s.task.clone(),
            opt(s.index),
            s.cron.clone(),
            s.timezone.clone(),
            instant(s.next_tick_ms),
            instant(s.last_tick_ms),
        ]);
    }
    t.render()
}

/// Runs `runlane schedules …`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let client = args.conn.client()?;
    let json = args.conn.json;
    match args.command {
        Command::List { env } => {
            let reply = client.list_schedules(&env).await?;
            emit(json, &reply.raw, || schedules_table(&reply.value.schedules));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_ticks_as_rfc3339_and_dashes_for_none() {
        let table = schedules_table(&[Schedule {
            task: "report".into(),
            index: Some(0),
            cron: "30 2 * * *".into(),
            timezone: "America/New_York".into(),
            next_tick_ms: Some(1_772_953_200_000),
            last_tick_ms: None,
        }]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("TASK"), "{table}");
        assert!(lines[1].contains("2026-03-08T07:00:00Z"), "{table}");
        assert!(lines[1].contains("America/New_York"), "{table}");
        assert!(lines[1].trim_end().ends_with('-'), "{table}");
    }
}
