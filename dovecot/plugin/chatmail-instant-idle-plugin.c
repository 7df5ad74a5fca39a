/* chatmail instant IDLE: tell IDLE-ing (and NOTIFY-ing) IMAP clients about a mailbox
   change on the next ioloop run instead of 500 ms later.

   Dovecot's storages watch a mailbox's files (Maildir: new/ and cur/) with
   mailbox_watch_add() (lib-storage/mailbox-watch.c). On a change, the watch's handler
   arms box->to_notify_delay with a fixed 500 ms (NOTIFY_DELAY_MSECS, not a setting), and
   only that timeout calls box->notify_callback. This plugin wraps the mailbox's
   notify_changes vfunc: right after the storage has added its watches, it adds one of
   its own for each of the storage's paths. On Linux both land on the same inotify watch
   (inotify_add_watch() returns the existing descriptor for a path already watched), and
   Dovecot's inotify dispatcher hands an event to the newest I/O on that descriptor, which
   is ours. Our handler does what the storage's does, with a 0 ms timeout: the same
   behaviour as dovecot/instant-idle.patch, without rebuilding Dovecot.

   Removal: inotify_rm_watch() on the shared descriptor ends the kernel watch for both
   I/Os, so ours are only ever removed immediately before the storage removes its own
   (notify_changes with no callback, close), never while the storage keeps watching.

   imap-hibernate: hibernation re-creates the storage's watches (box->notify_files) in a
   fresh ioloop and passes that inotify fd on; it never sees ours, which go away with the
   mailbox when the imap process lets the client go.

   Works with Dovecot 2.3 and 2.4: the API used here is the same in both. */

#include "lib.h"
#include "array.h"
#include "ioloop.h"
#include "module-context.h"
#include "mail-storage-private.h"
#include "mail-storage-hooks.h"

/* When the client is told of a change, each counted from the one before: at once; again
   when stock Dovecot would have told it (the change may be a delivery still being
   recorded); and once more after Maildir's "dirty" window (instant_idle_look()). */
static const unsigned int instant_idle_look_msecs[] = { 0, 500, 2500 };

#define INSTANT_IDLE_CONTEXT_REQUIRE(obj) \
	MODULE_CONTEXT_REQUIRE(obj, chatmail_instant_idle_storage_module)

/* The leading fields of mailbox-watch.c's struct mailbox_notify_file (one per path the
   storage watches; box->notify_files is the list). Only these two are read. The layout
   is the same from Dovecot 2.3.0 through 2.4 and main; a plugin is only loaded into the
   Dovecot ABI it was built for (chatmail_instant_idle_plugin_version). */
struct chatmail_notify_file_head {
	struct chatmail_notify_file_head *next;
	const char *path;
};

struct chatmail_instant_idle_mailbox {
	union mailbox_module_context module_ctx;

	/* our notify I/Os, one per storage watch */
	ARRAY(struct io *) ios;
	/* box->to_notify_delay while it is ours: the next look at the mailbox */
	struct timeout *to_look;
	/* index of that look in instant_idle_look_msecs */
	unsigned int look;
};

void chatmail_instant_idle_plugin_init(struct module *module);
void chatmail_instant_idle_plugin_deinit(void);

const char *chatmail_instant_idle_plugin_version = DOVECOT_ABI_VERSION;

static MODULE_CONTEXT_DEFINE_INIT(chatmail_instant_idle_storage_module,
				  &mail_storage_module_register);

static void instant_idle_forget_timeout(struct mailbox *box,
					struct chatmail_instant_idle_mailbox *ibox)
{
	/* mailbox_watch_remove_all() removes box->to_notify_delay */
	if (box->to_notify_delay != ibox->to_look)
		ibox->to_look = NULL;
}

static void instant_idle_look(struct mailbox *box);

static void instant_idle_arm_look(struct mailbox *box,
				  struct chatmail_instant_idle_mailbox *ibox,
				  unsigned int look)
{
	ibox->look = look;
	ibox->to_look = timeout_add_short(instant_idle_look_msecs[look],
					  instant_idle_look, box);
	box->to_notify_delay = ibox->to_look;
}

/* Tell the client (the callback syncs the mailbox and sends what it finds), and arm the
   next look first: the callback may close the mailbox, which removes it.

   Why three looks. The first change can be a delivery still in progress, which the sync
   at once misses, and the rest of it (index, dovecot-uidlist) is outside the watched
   directories, so no further event comes: with attachment flags on (Dovecot 2.4.2's
   default; our configuration turns them off) a delivery is renamed into cur/ and records
   cur/'s mtime in the index before the message itself. The look 500 ms later, when
   Dovecot would have told the client, finds it. And a sync that moves files from new/ to
   cur/ records new/'s mtime after its scan: a delivery renamed into new/ between the
   scan and that stat, whose process could not lock dovecot-uidlist (the sync held it;
   LMTP then leaves the file to the next sync), is invisible to every sync until the scan
   is older than MAILDIR_SYNC_SECS in whole seconds (DIR_DELAYED_REFRESH in
   maildir-sync.c). Its own inotify event comes at once, so only a look 2 s or more after
   the last scan finds it; without one it waited for the 30 s polling
   (bench/check_idle_overload.py). The last look is armed before the second look's sync
   starts, hence 2.5 s, not 2. */
static void instant_idle_look(struct mailbox *box)
{
	struct chatmail_instant_idle_mailbox *ibox = INSTANT_IDLE_CONTEXT_REQUIRE(box);
	unsigned int next = ibox->look + 1;

	i_assert(box->to_notify_delay == ibox->to_look);
	ibox->to_look = NULL;
	timeout_remove(&box->to_notify_delay);
	if (next < N_ELEMENTS(instant_idle_look_msecs))
		instant_idle_arm_look(box, ibox, next);
	if (box->notify_callback != NULL)
		box->notify_callback(box, box->notify_context);
}

/* A watched path changed: the storage's handler, without the 500 ms. */
static void instant_idle_changed(struct mailbox *box)
{
	struct chatmail_instant_idle_mailbox *ibox = INSTANT_IDLE_CONTEXT_REQUIRE(box);

	/* the storage's own handler postpones its polling fallback too */
	if (box->to_notify != NULL)
		timeout_reset(box->to_notify);

	if (box->to_notify_delay != NULL && box->to_notify_delay == ibox->to_look &&
	    ibox->look == 0)
		return; /* already due on the next ioloop run: changes merge */

	/* a pending later look, or the storage's 500 ms timeout should its handler have
	   run as well, is replaced: the looks start again from this change. A timeout
	   (not a direct call) merges the changes of one ioloop run and runs the client's
	   callback outside the inotify handler, as the patched Dovecot does */
	ibox->to_look = NULL;
	timeout_remove(&box->to_notify_delay);
	instant_idle_arm_look(box, ibox, 0);
}

static void instant_idle_remove_ios(struct chatmail_instant_idle_mailbox *ibox)
{
	struct io **io;

	/* the first io_remove() ends the shared kernel watch; the storage's removal right
	   after gets EINVAL from inotify_rm_watch(), which Dovecot ignores silently */
	array_foreach_modifiable(&ibox->ios, io)
		io_remove(io);
	array_clear(&ibox->ios);
}

static void instant_idle_notify_changes(struct mailbox *box)
{
	struct chatmail_instant_idle_mailbox *ibox = INSTANT_IDLE_CONTEXT_REQUIRE(box);
	struct chatmail_notify_file_head *old_head =
		(struct chatmail_notify_file_head *)box->notify_files;
	struct chatmail_notify_file_head *file;
	struct io *io;

	if (box->notify_callback == NULL) {
		/* ours first: the kernel's IN_IGNORED for the removed watch then finds no I/O */
		instant_idle_remove_ios(ibox);
		ibox->module_ctx.super.notify_changes(box);
		instant_idle_forget_timeout(box, ibox);
		return;
	}

	ibox->module_ctx.super.notify_changes(box);
	/* the storage prepends the watches it just added: shadow exactly those (also when
	   notifications are re-armed, as the storage then adds duplicates) */
	for (file = (struct chatmail_notify_file_head *)box->notify_files;
	     file != NULL && file != old_head; file = file->next) {
		if (io_add_notify(file->path, instant_idle_changed, box, &io) ==
		    IO_NOTIFY_ADDED)
			array_push_back(&ibox->ios, &io);
		/* else: no inotify; the storage's watch (or its polling) stays in charge */
	}
}

static void instant_idle_close(struct mailbox *box)
{
	struct chatmail_instant_idle_mailbox *ibox = INSTANT_IDLE_CONTEXT_REQUIRE(box);

	/* index_storage_mailbox_close() removes the storage's watches */
	instant_idle_remove_ios(ibox);
	ibox->module_ctx.super.close(box);
	instant_idle_forget_timeout(box, ibox);
}

static void instant_idle_mailbox_allocated(struct mailbox *box)
{
	struct mailbox_vfuncs *v = box->vlast;
	struct chatmail_instant_idle_mailbox *ibox;

	ibox = p_new(box->pool, struct chatmail_instant_idle_mailbox, 1);
	ibox->module_ctx.super = *v;
	box->vlast = &ibox->module_ctx.super;
	p_array_init(&ibox->ios, box->pool, 2);

	v->notify_changes = instant_idle_notify_changes;
	v->close = instant_idle_close;
	MODULE_CONTEXT_SET(box, chatmail_instant_idle_storage_module, ibox);
}

static struct mail_storage_hooks chatmail_instant_idle_mail_storage_hooks = {
	.mailbox_allocated = instant_idle_mailbox_allocated,
};

void chatmail_instant_idle_plugin_init(struct module *module)
{
	mail_storage_hooks_add(module, &chatmail_instant_idle_mail_storage_hooks);
}

void chatmail_instant_idle_plugin_deinit(void)
{
	mail_storage_hooks_remove(&chatmail_instant_idle_mail_storage_hooks);
}
