//! Compiles Envoy's API protos (shipped inside the envoy-types crate) and our own `proto/` into one
//! descriptor set, so config parsing, `typed_config` resolution and gRPC reflection need no protoc.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use prost::Message;
use protox::file::{ChainFileResolver, File, FileResolver, GoogleFileResolver, IncludeFileResolver};
use protox::prost_reflect::prost_types::{DescriptorProto, FileDescriptorSet};

/// Include roots inside envoy-types' `proto/` folder; imports in Envoy's files resolve against these.
const ENVOY_INCLUDE_DIRS: &[&str] = &[
    "data-plane-api",
    "xds",
    "protoc-gen-validate",
    "googleapis",
    "cel-spec/proto",
    "opentelemetry-proto",
    "client_model",
];

/// How many mis-resolved references one file may have patched before it is given up on.
const MAX_PATCHES_PER_FILE: usize = 8;

fn main() -> Result<()> {
    let started = Instant::now();
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let own_proto_dir = manifest_dir.join("proto");

    println!("cargo:rerun-if-changed=build.rs");
    // A missing path would make cargo rerun this script on every build (git keeps no empty proto/).
    if own_proto_dir.exists() {
        println!("cargo:rerun-if-changed={}", own_proto_dir.display());
    }
    // The Envoy protos live in the registry copy of envoy-types; a version bump shows up only here.
    let lock_file = manifest_dir.join("Cargo.lock");
    if lock_file.exists() {
        println!("cargo:rerun-if-changed={}", lock_file.display());
    }

    let envoy_proto_dir = envoy_types_proto_dir(&manifest_dir)?;
    let mut includes: Vec<PathBuf> = ENVOY_INCLUDE_DIRS.iter().map(|dir| envoy_proto_dir.join(dir)).collect();
    let mut files = Vec::new();
    // Every Envoy proto, not only those envoy-types generated Rust for, so that any `@type` a user
    // writes in a `typed_config` resolves and can be rejected by name rather than as unknown.
    let data_plane_api = envoy_proto_dir.join("data-plane-api");
    collect_protos(&data_plane_api, &data_plane_api.join("envoy"), &mut files)?;
    files.push("google/rpc/status.proto".to_owned());
    if own_proto_dir.is_dir() {
        includes.push(own_proto_dir.clone());
        collect_protos(&own_proto_dir, &own_proto_dir, &mut files)?;
    }
    files.sort();

    let (set, skipped) = compile(&includes, &files)?;
    if skipped.len() == files.len() {
        bail!("no proto file compiled (looked in {})", envoy_proto_dir.display());
    }
    for (file, err) in &skipped {
        println!("cargo:warning=skipping {file}: {err}");
    }

    let bytes = set.encode_to_vec();
    let out_file = out_dir.join("envoy_descriptors.bin");
    std::fs::write(&out_file, &bytes).with_context(|| format!("writing {}", out_file.display()))?;
    println!(
        "compiled {} of {} proto files ({} skipped; {} files with imports) into {} bytes in {:.2?}",
        files.len() - skipped.len(),
        files.len(),
        skipped.len(),
        set.file.len(),
        bytes.len(),
        started.elapsed()
    );
    Ok(())
}

/// Compiles `files` into one set, imports included, source info stripped. Returns the files that
/// could not be compiled, with the reason.
///
/// protox resolves a relative type name against every package in its pool, where protoc only
/// looks at the packages of the file's direct imports. With all of Envoy in one pool, a reference
/// such as `config.core.v3.DataSource` inside `envoy.extensions.filters...` binds to the unrelated
/// package `envoy.extensions.config` and fails. Files that fail are retried in fresh compilers,
/// whose pools hold fewer packages; the last resort rewrites each mis-bound reference to the
/// fully-qualified name protoc would have picked. Compiled descriptors hold only fully-qualified
/// names, so sets from different compilers merge by file name.
fn compile(includes: &[PathBuf], files: &[String]) -> Result<(FileDescriptorSet, Vec<(String, String)>)> {
    let mut merged = MergedSet::default();
    let mut pending = files.to_vec();
    let mut failed = Vec::new();
    loop {
        let mut compiler = compiler(includes, None);
        failed.clear();
        for file in &pending {
            // Keep going: one broken file must not take every other Envoy type down with it.
            if compiler.open_file(file).is_err() {
                failed.push(file.clone());
            }
        }
        merged.add(compiler.file_descriptor_set());
        if failed.is_empty() || failed.len() == pending.len() {
            break;
        }
        pending = failed.clone();
    }

    let mut skipped = Vec::new();
    for file in failed {
        match compile_patched(includes, &file, &merged) {
            Ok(set) => merged.add(set),
            Err(err) => skipped.push((file, err)),
        }
    }
    Ok((merged.set, skipped))
}

/// Compiles one file alone, rewriting references that protox binds to the wrong package (see
/// [`compile`]) to the innermost enclosing scope that does define them, as protoc does.
fn compile_patched(includes: &[PathBuf], file: &str, merged: &MergedSet) -> Result<FileDescriptorSet, String> {
    let mut patched: Option<String> = None;
    for _ in 0..=MAX_PATCHES_PER_FILE {
        let override_source = patched.clone().map(|source| (file.to_owned(), source));
        let mut compiler = compiler(includes, override_source);
        let err = match compiler.open_file(file) {
            Ok(_) => return Ok(compiler.file_descriptor_set()),
            Err(err) => err.to_string(),
        };
        let Some((relative, wrong)) = parse_misresolution(&err) else {
            return Err(err);
        };
        let Some(right) = merged.resolve_outward(relative, wrong) else {
            return Err(err);
        };
        let source = match patched.take() {
            Some(source) => source,
            None => read_source(includes, file).ok_or_else(|| err.clone())?,
        };
        patched = Some(replace_type_reference(&source, relative, &format!(".{right}")));
    }
    Err(format!("more than {MAX_PATCHES_PER_FILE} mis-resolved references"))
}

/// Parses protox's "'a.B' resolves to 'x.y.a.B', which is not defined" into (`a.B`, `x.y.a.B`).
fn parse_misresolution(err: &str) -> Option<(&str, &str)> {
    let rest = err.strip_prefix('\'')?;
    let (relative, rest) = rest.split_once("' resolves to '")?;
    let (wrong, _) = rest.split_once("', which is not defined")?;
    Some((relative, wrong))
}

fn read_source(includes: &[PathBuf], file: &str) -> Option<String> {
    includes.iter().find_map(|dir| std::fs::read_to_string(dir.join(file)).ok())
}

/// Replaces `relative` where it stands as a whole type reference (not part of a longer name).
fn replace_type_reference(source: &str, relative: &str, absolute: &str) -> String {
    let is_name_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.';
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(at) = rest.find(relative) {
        let before = rest[..at].chars().next_back();
        let after = rest[at + relative.len()..].chars().next();
        out.push_str(&rest[..at]);
        if before.is_some_and(is_name_char) || after.is_some_and(is_name_char) {
            out.push_str(relative);
        } else {
            out.push_str(absolute);
        }
        rest = &rest[at + relative.len()..];
    }
    out.push_str(rest);
    out
}

/// A compiler over the include roots; `override_source` serves one file from memory instead.
fn compiler(includes: &[PathBuf], override_source: Option<(String, String)>) -> protox::Compiler {
    let mut resolver = ChainFileResolver::new();
    if let Some((name, source)) = override_source {
        resolver.add(InMemoryFile { name, source });
    }
    for include in includes {
        resolver.add(IncludeFileResolver::new(include.clone()));
    }
    resolver.add(GoogleFileResolver::new());
    let mut compiler = protox::Compiler::with_file_resolver(resolver);
    // Imports (google/protobuf, validate, udpa, xds) must be in the set for it to stand alone.
    compiler.include_imports(true).include_source_info(false);
    compiler
}

struct InMemoryFile {
    name: String,
    source: String,
}

impl FileResolver for InMemoryFile {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        if name == self.name { File::from_source(name, &self.source) } else { Err(protox::Error::file_not_found(name)) }
    }
}

/// The union of several compilers' output, each file once, dependencies before dependents.
#[derive(Default)]
struct MergedSet {
    set: FileDescriptorSet,
    file_names: HashSet<String>,
    type_names: HashSet<String>,
}

impl MergedSet {
    fn add(&mut self, set: FileDescriptorSet) {
        // Each compiler emits dependencies first; keeping the first copy of each file in arrival
        // order keeps the merged set in dependency order too.
        for file in set.file {
            if !self.file_names.insert(file.name().to_owned()) {
                continue;
            }
            let package = file.package();
            for message in &file.message_type {
                collect_type_names(package, message, &mut self.type_names);
            }
            for enumeration in &file.enum_type {
                self.type_names.insert(format!("{package}.{}", enumeration.name()));
            }
            self.set.file.push(file);
        }
    }

    /// `wrong` is `relative` qualified by the innermost scope; tries each enclosing scope in turn.
    fn resolve_outward(&self, relative: &str, wrong: &str) -> Option<String> {
        let mut scope = wrong.strip_suffix(relative)?.strip_suffix('.')?;
        while let Some((outer, _)) = scope.rsplit_once('.') {
            let candidate = format!("{outer}.{relative}");
            if self.type_names.contains(&candidate) {
                return Some(candidate);
            }
            scope = outer;
        }
        self.type_names.contains(relative).then(|| relative.to_owned())
    }
}

fn collect_type_names(scope: &str, message: &DescriptorProto, names: &mut HashSet<String>) {
    let name = format!("{scope}.{}", message.name());
    for nested in &message.nested_type {
        collect_type_names(&name, nested, names);
    }
    for enumeration in &message.enum_type {
        names.insert(format!("{name}.{}", enumeration.name()));
    }
    names.insert(name);
}

/// Asks cargo where envoy-types was unpacked, which works for registry, vendored and path copies alike.
fn envoy_types_proto_dir(manifest_dir: &Path) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new(cargo);
    command.args(["metadata", "--format-version", "1"]).current_dir(manifest_dir);
    // Only this target's packages, so metadata never downloads crates for other platforms.
    if let Ok(target) = std::env::var("TARGET") {
        command.args(["--filter-platform", &target]);
    }
    let output = command.output().context("running cargo metadata")?;
    if !output.status.success() {
        bail!("cargo metadata failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("parsing cargo metadata output")?;
    let manifest_path = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|package| package["name"] == "envoy-types")
        .and_then(|package| package["manifest_path"].as_str())
        .context("envoy-types is not in cargo metadata")?;
    let proto_dir = Path::new(manifest_path).parent().context("envoy-types manifest path has no parent")?.join("proto");
    if !proto_dir.is_dir() {
        bail!("{} is not a directory", proto_dir.display());
    }
    Ok(proto_dir)
}

/// Collects `.proto` files under `dir` as names relative to the include root `root`, the form
/// imports use, so protox never sees one file under two names.
fn collect_protos(root: &Path, dir: &Path, files: &mut Vec<String>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(root, &path, files)?;
        } else if path.extension().is_some_and(|ext| ext == "proto") {
            let relative = path.strip_prefix(root)?;
            let name = relative.to_str().with_context(|| format!("non-UTF-8 path {}", path.display()))?;
            files.push(name.replace(std::path::MAIN_SEPARATOR, "/"));
        }
    }
    Ok(())
}
