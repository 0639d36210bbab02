//! The testbed kernel: built from `testbed/kernel/` and cached by a hash of that recipe.

use crate::{cache_dir, repo_root, status, Result};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::process::Command;

/// Hash of everything that decides the image: the pinned source, the config fragment,
/// the build script and the patches (by name and content).
pub fn recipe_hash() -> Result<String> {
    let dir = repo_root().join("testbed/kernel");
    let mut files = vec![
        dir.join("SOURCE"),
        dir.join("config.fragment"),
        dir.join("build.sh"),
    ];
    let mut patches: Vec<PathBuf> = std::fs::read_dir(dir.join("patches"))
        .map_err(|e| format!("testbed/kernel/patches: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "patch"))
        .collect();
    patches.sort();
    files.extend(patches);

    let mut h = Sha256::new();
    for f in &files {
        let data = std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()))?;
        let name = f.file_name().unwrap_or_default().to_string_lossy();
        h.update(name.as_bytes());
        h.update([0]);
        h.update((data.len() as u64).to_le_bytes());
        h.update(&data);
    }
    let digest = h.finalize();
    Ok(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
}

/// Returns a bzImage for the current recipe: `../shared/testbed-kernels/<hash>/bzImage`
/// beside the checkout, else the user's cache, else a fresh build (about 13 min on 2 cores).
pub fn ensure_kernel() -> Result<PathBuf> {
    let hash = recipe_hash()?;
    let shared = repo_root()
        .join("../shared/testbed-kernels")
        .join(&hash)
        .join("bzImage");
    if shared.is_file() {
        return Ok(shared);
    }
    let cached = cache_dir()
        .join("testbed-kernels")
        .join(&hash)
        .join("bzImage");
    if cached.is_file() {
        return Ok(cached);
    }
    eprintln!(
        "xtask: building the testbed kernel {hash} (about 13 minutes on 2 cores; cached afterwards)"
    );
    let work = cache_dir().join("kbuild");
    status(
        Command::new("bash")
            .arg(repo_root().join("testbed/kernel/build.sh"))
            .arg(&work)
            .arg(&cached),
        "testbed kernel build",
    )?;
    // The unpacked tree is large; the downloaded source archive stays for the next build.
    let _ = std::fs::remove_dir_all(work.join("src"));
    Ok(cached)
}
