//! `portcullis group …`.

use clap::Subcommand;

use crate::config::Config;
use crate::store::Store;

/// Manage groups.
#[derive(Debug, Subcommand)]
pub enum GroupCmd {
    /// Add a group.
    Add {
        /// Unique name.
        name: String,
    },
    /// List groups and their members.
    List,
    /// Put a user or service account into a group.
    AddMember {
        /// Group.
        group: String,
        /// User or service account.
        member: String,
    },
    /// Take a user or service account out of a group.
    RemoveMember {
        /// Group.
        group: String,
        /// User or service account.
        member: String,
    },
}

/// Runs a group command.
pub fn run(cmd: GroupCmd, config: &Config) -> anyhow::Result<()> {
    super::runtime()?.block_on(async {
        let store = Store::connect(&config.store.url).await?;
        match cmd {
            GroupCmd::Add { name } => {
                store.group_add(&name, super::user::now()).await??;
                println!("added group {name}");
            }
            GroupCmd::List => {
                println!("{:<24} MEMBERS", "GROUP");
                for (name, members) in store.group_list().await? {
                    let members = if members.is_empty() { "-".to_owned() } else { members.join(",") };
                    println!("{name:<24} {members}");
                }
            }
            GroupCmd::AddMember { group, member } => {
                store.group_member(&group, &member, true).await??;
                println!("{member} is in group {group}");
            }
            GroupCmd::RemoveMember { group, member } => {
                store.group_member(&group, &member, false).await??;
                println!("{member} is not in group {group}");
            }
        }
        store.close().await;
        Ok(())
    })
}
