//! Tidiness rules checked as tests: every source file of the crates and the binary
//! starts with a `//!` header saying what it owns, and no test is hidden with
//! the ignore attribute.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn workspace_files(dirs: &[&str]) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in dirs {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 20, "found only {} files", files.len());
    files
}

#[test]
fn every_module_starts_with_a_header_comment() {
    let sources = [
        "src",
        "engine/src",
        "net/src",
        "storage/src",
        "nexmark/src",
        "bench/src",
    ];
    let missing: Vec<_> = workspace_files(&sources)
        .into_iter()
        .filter(|path| {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            !text.trim_start().starts_with("//!")
        })
        .collect();
    assert!(
        missing.is_empty(),
        "files without a //! header: {missing:?}"
    );
}

#[test]
fn no_test_is_ignored() {
    let dirs = ["src", "engine", "net", "storage", "bench", "tests"];
    let marker = concat!("#[", "ignore");
    let hidden: Vec<_> = workspace_files(&dirs)
        .into_iter()
        .filter(|path| !path.components().any(|c| c.as_os_str() == "target"))
        .filter(|path| {
            std::fs::read_to_string(path)
                .unwrap_or_default()
                .contains(marker)
        })
        .collect();
    assert!(hidden.is_empty(), "ignored tests in {hidden:?}");
}
