//! Records the git revision the binary is built from (`RUNLANE_GIT_REVISION`), so a bench line
//! names the code that measured it, not the checkout it happens to run in.

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    Some(text.trim().to_string())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let Some(revision) = git(&["rev-parse", "--short", "HEAD"]) else {
        return;
    };
    // Rebuild when HEAD moves: HEAD itself, the branch it points to, and packed refs.
    if let Some(git_dir) = git(&["rev-parse", "--git-dir"]) {
        println!(
            "cargo:rerun-if-changed={}",
            PathBuf::from(&git_dir).join("HEAD").display()
        );
    }
    if let (Some(common), Some(branch)) = (
        git(&["rev-parse", "--git-common-dir"]),
        git(&["symbolic-ref", "-q", "HEAD"]),
    ) {
        let common = PathBuf::from(common);
        println!("cargo:rerun-if-changed={}", common.join(branch).display());
        println!(
            "cargo:rerun-if-changed={}",
            common.join("packed-refs").display()
        );
    }
    println!("cargo:rustc-env=RUNLANE_GIT_REVISION={revision}");
}
