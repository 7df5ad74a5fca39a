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

#define NOTIFY_INSTANT_MSECS 0
/* Dovecot's own delay: when it would have told the client, it is told again */
#define NOTIFY_SECOND_LOOK_MSECS 500

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
	/* box->to_notify_delay while it is ours: the instant notification, or the second
	   look after it (at most one of them is set) */
	struct timeout *to_instant;
	struct timeout *to_second_look;
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
	if (box->to_notify_delay != ibox->to_instant)
		ibox->to_instant = NULL;
	if (box->to_notify_delay != ibox->to_second_look)
		ibox->to_second_look = NULL;
}

static void instant_idle_second_look(struct mailbox *box)
{
	struct chatmail_instant_idle_mailbox *ibox = INSTANT_IDLE_CONTEXT_REQUIRE(box);

	i_assert(box->to_notify_delay == ibox->to_second_look);
	ibox->to_second_look = NULL;
	timeout_remove(&box->to_notify_delay);
	if (box->notify_callback != NULL)
		box->notify_callback(box, box->notify_context);
}

static void instant_idle_notify(struct mailbox *box)
{
	struct chatmail_instant_idle_mailbox *ibox = INSTANT_IDLE_CONTEXT_REQUIRE(box);

	i_assert(box->to_notify_delay == ibox->to_instant);
	ibox->to_instant = NULL;
	timeout_remove(&box->to_notify_delay);
	/* The change that woke us may be a delivery still in progress: Maildir's file is in
	   new/ before the delivering process has recorded it in the index and
	   dovecot-uidlist (outside the watched directories, so no further event comes), and
	   the client's sync now may miss it. Dovecot's 500 ms hid that; without them about
	   one in five first notifications in Dovecot 2.4.5 waited for the 30 s polling.
	   So the client is told again when Dovecot would have told it: never later than
	   stock Dovecot, and a second look costs one sync that usually finds nothing new.
	   Armed before the callback, which may close the mailbox (close removes it). */
	ibox->to_second_look = timeout_add_short(NOTIFY_SECOND_LOOK_MSECS,
						 instant_idle_second_look, box);
	box->to_notify_delay = ibox->to_second_look;
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

	if (box->to_notify_delay != NULL && box->to_notify_delay == ibox->to_instant)
		return; /* already due on the next ioloop run: changes merge */

	/* a pending second look, or the storage's 500 ms timeout should its handler have
	   run as well, is replaced: the second look follows the instant notification */
	ibox->to_second_look = NULL;
	timeout_remove(&box->to_notify_delay);
	/* a timeout (not a direct call) merges the changes of one ioloop run and runs the
	   client's callback outside the inotify handler, as the patched Dovecot does */
	ibox->to_instant = timeout_add_short(NOTIFY_INSTANT_MSECS, instant_idle_notify, box);
	box->to_notify_delay = ibox->to_instant;
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
