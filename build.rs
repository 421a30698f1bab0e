//! Embeds `migrations/V*__*.sql` into the binary (what refinery's `embed_migrations!` does), so a
//! new migration file is picked up by the next build without touching any Rust code.

use std::{env, fs, path::Path};

fn main() {
    println!("cargo:rerun-if-changed=migrations");
    // Read at run time, not with env!(): a build script binary reused from another checkout
    // (a copied target/ of a git worktree) would otherwise embed that checkout's migrations.
    let dir = Path::new(&env::var("CARGO_MANIFEST_DIR").unwrap()).join("migrations");
    let mut files: Vec<String> = fs::read_dir(&dir)
        .expect("migrations/ exists")
        .map(|entry| {
            entry
                .expect("readable migrations/")
                .file_name()
                .into_string()
                .expect("UTF-8 file name")
        })
        .filter(|name| name.ends_with(".sql"))
        .collect();
    files.sort_by_key(|name| version(name));
    let mut out = String::from(
        "/// (name, sql) of every migration, in version order.\npub const MIGRATIONS: &[(&str, &str)] = &[\n",
    );
    for name in &files {
        let stem = name.trim_end_matches(".sql");
        out.push_str(&format!(
            "    ({stem:?}, include_str!({:?})),\n",
            dir.join(name).display().to_string()
        ));
    }
    out.push_str("];\n");
    fs::write(
        Path::new(&env::var("OUT_DIR").unwrap()).join("migrations.rs"),
        out,
    )
    .unwrap();
}

/// `V12__name.sql` → 12, so that V10 sorts after V9.
fn version(name: &str) -> u32 {
    name.trim_start_matches(['V', 'U'])
        .split("__")
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("migration {name} is not named V<number>__<name>.sql"))
}
