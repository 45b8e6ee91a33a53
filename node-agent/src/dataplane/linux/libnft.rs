//! nftables in process: the netfilter project's libnftables (the library
//! behind the `nft` command, shipped with it as `libnftables.so.1`), loaded
//! when the first context is made. One call of [`Nft::run`] is one netlink
//! batch, i.e. one transaction, exactly like `nft -f -` with the same text, so
//! the plans stay nft text (golden files, `--dry-run`) and what is sent is what
//! they show; no process is started on the lease path.
//!
//! Loaded with `dlopen` rather than linked, so that the agent builds where the
//! library is absent (FreeBSD, CI without nftables) and fails with a clear
//! error only when the Linux data plane is used there.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::OnceLock;

use crate::dataplane::DataPlaneError;

/// The library's soname.
pub const LIBRARY: &str = "libnftables.so.1";

/// `NFT_CTX_OUTPUT_JSON` of `enum nft_ctx_output_flags`.
const OUTPUT_JSON: u32 = 1 << 4;

type CtxNew = unsafe extern "C" fn(u32) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(*mut c_void);
type CtxInt = unsafe extern "C" fn(*mut c_void) -> c_int;
type CtxStr = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type SetFlags = unsafe extern "C" fn(*mut c_void, u32);
type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

struct Api {
    ctx_new: CtxNew,
    ctx_free: CtxFree,
    buffer_output: CtxInt,
    buffer_error: CtxInt,
    get_output: CtxStr,
    get_error: CtxStr,
    set_output_flags: SetFlags,
    run_cmd: RunCmd,
}

fn api() -> Result<&'static Api, DataPlaneError> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(load)
        .as_ref()
        .map_err(|e| DataPlaneError::Unsupported(e.clone()))
}

fn load() -> Result<Api, String> {
    let name = CString::new(LIBRARY).expect("no NUL");
    // SAFETY: dlopen with a NUL-terminated name; the handle is never closed,
    // so the symbols stay valid for the life of the process.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns a NUL-terminated string or NULL.
        let why = unsafe { libc::dlerror() };
        let why = if why.is_null() {
            "unknown error".to_string()
        } else {
            // SAFETY: non-NULL, NUL-terminated (see above).
            unsafe { CStr::from_ptr(why) }
                .to_string_lossy()
                .into_owned()
        };
        return Err(format!(
            "loading {LIBRARY} ({why}); install nftables (Debian: apt install nftables)"
        ));
    }
    let sym = |s: &str| -> Result<*mut c_void, String> {
        let c = CString::new(s).expect("no NUL");
        // SAFETY: dlsym on a valid handle with a NUL-terminated name.
        let p = unsafe { libc::dlsym(handle, c.as_ptr()) };
        if p.is_null() {
            Err(format!("{LIBRARY} has no symbol {s}"))
        } else {
            Ok(p)
        }
    };
    // SAFETY: each symbol has the C signature of libnftables' public API
    // (nftables/libnftables.h), which the types above repeat.
    unsafe {
        Ok(Api {
            ctx_new: std::mem::transmute::<*mut c_void, CtxNew>(sym("nft_ctx_new")?),
            ctx_free: std::mem::transmute::<*mut c_void, CtxFree>(sym("nft_ctx_free")?),
            buffer_output: std::mem::transmute::<*mut c_void, CtxInt>(sym(
                "nft_ctx_buffer_output",
            )?),
            buffer_error: std::mem::transmute::<*mut c_void, CtxInt>(sym("nft_ctx_buffer_error")?),
            get_output: std::mem::transmute::<*mut c_void, CtxStr>(sym(
                "nft_ctx_get_output_buffer",
            )?),
            get_error: std::mem::transmute::<*mut c_void, CtxStr>(sym("nft_ctx_get_error_buffer")?),
            set_output_flags: std::mem::transmute::<*mut c_void, SetFlags>(sym(
                "nft_ctx_output_set_flags",
            )?),
            run_cmd: std::mem::transmute::<*mut c_void, RunCmd>(sym("nft_run_cmd_from_buffer")?),
        })
    }
}

/// One libnftables context. Its netlink socket belongs to the network
/// namespace of the thread that made it.
pub struct Nft {
    api: &'static Api,
    ctx: *mut c_void,
}

// SAFETY: a context is used by one thread at a time (`&mut self`); libnftables
// keeps no thread-local state.
unsafe impl Send for Nft {}

impl Nft {
    pub fn new() -> Result<Self, DataPlaneError> {
        let api = api()?;
        // SAFETY: the library's constructor; 0 = default flags.
        let ctx = unsafe { (api.ctx_new)(0) };
        if ctx.is_null() {
            return Err(DataPlaneError::Unsupported(format!(
                "{LIBRARY}: nft_ctx_new failed"
            )));
        }
        // SAFETY: a live context; output and errors go to buffers, not stdio.
        unsafe {
            (api.buffer_output)(ctx);
            (api.buffer_error)(ctx);
        }
        Ok(Nft { api, ctx })
    }

    /// Runs `cmds` (nft syntax) as one transaction; returns what nft would
    /// print (listings).
    pub fn run(&mut self, cmds: &str) -> Result<String, DataPlaneError> {
        self.run_flags(cmds, 0)
    }

    /// [`Nft::run`] with JSON output (`nft -j`).
    pub fn run_json(&mut self, cmds: &str) -> Result<String, DataPlaneError> {
        self.run_flags(cmds, OUTPUT_JSON)
    }

    fn run_flags(&mut self, cmds: &str, flags: u32) -> Result<String, DataPlaneError> {
        let text = CString::new(cmds).map_err(|_| DataPlaneError::Command {
            command: cmds.to_string(),
            detail: "contains a NUL byte".into(),
        })?;
        // SAFETY: a live context and a NUL-terminated buffer; the returned
        // buffers are owned by the context and copied before the next call.
        let (rc, out, err) = unsafe {
            (self.api.set_output_flags)(self.ctx, flags);
            let rc = (self.api.run_cmd)(self.ctx, text.as_ptr());
            (
                rc,
                buffer((self.api.get_output)(self.ctx)),
                buffer((self.api.get_error)(self.ctx)),
            )
        };
        if rc != 0 {
            return Err(DataPlaneError::Command {
                command: format!("nft -f - <<EOF\n{cmds}EOF"),
                detail: err.trim().to_string(),
            });
        }
        Ok(out)
    }
}

/// Copies a C string owned by the library (NULL reads as empty).
///
/// # Safety
/// `p` is NULL or a NUL-terminated string valid for the call.
unsafe fn buffer(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: per the contract above.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

impl Drop for Nft {
    fn drop(&mut self) {
        // SAFETY: the context was made by nft_ctx_new and is freed once.
        unsafe { (self.api.ctx_free)(self.ctx) }
    }
}
