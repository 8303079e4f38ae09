// SPDX-License-Identifier: GPL-2.0-only
/*
 * KVM's functions for the live update handlers, which are built in while KVM
 * may be a module.
 *
 * The handlers and their Rust abstractions are part of the kernel image: the
 * Rust kernel crate cannot call into a module, and LUO must know every handler
 * when /dev/liveupdate is first opened after a kexec, before any module may
 * have loaded. KVM lends the handlers its functions instead: kvm_init()
 * registers a struct kvm_luo_ops, and kvm_exit() takes it back.
 *
 * The calls given an object of KVM's (a file or an inode of KVM's, or a VM
 * reference taken here) cannot find KVM gone: the object pins the module that
 * registered the ops (the vendor module, which holds kvm.ko), since kvm_init()
 * makes it the owner of KVM's files, and the references taken here pin it too.
 * The others pin it for their duration, and return an error, or "not KVM's",
 * when no KVM is loaded.
 */

#include <linux/bug.h>
#include <linux/cleanup.h>
#include <linux/err.h>
#include <linux/fs.h>
#include <linux/kvm_luo.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/rcupdate.h>

/* What kvm_init() registered, and the module it pins. */
struct kvm_luo_reg {
	const struct kvm_luo_ops *ops;
	struct module *owner;
};

static struct kvm_luo_reg kvm_luo_reg;
static struct kvm_luo_reg __rcu *kvm_luo_cur;
static DEFINE_MUTEX(kvm_luo_lock);

/**
 * kvm_luo_register - Lend live update KVM's functions.
 * @ops:   Every op set.
 * @owner: The module whose exit calls kvm_luo_unregister(), which owns KVM's
 *         files (NULL when built in).
 *
 * Called last in kvm_init(), once nothing can fail any more: what the ops
 * create pins @owner, and a module whose init fails is freed regardless.
 */
void kvm_luo_register(const struct kvm_luo_ops *ops, struct module *owner)
{
	guard(mutex)(&kvm_luo_lock);
	/* kvm_x86_vendor_init() lets one vendor module in at a time. */
	if (WARN_ON_ONCE(rcu_access_pointer(kvm_luo_cur)))
		return;
	kvm_luo_reg.ops = ops;
	kvm_luo_reg.owner = owner;
	rcu_assign_pointer(kvm_luo_cur, &kvm_luo_reg);
}
EXPORT_SYMBOL_FOR_KVM(kvm_luo_register);

/**
 * kvm_luo_unregister - Take back what kvm_luo_register() lent.
 * @ops:   What it was given.
 * @owner: And the owner it was given.
 *
 * Called while the owner is going away, so no call can pin it any more;
 * returns once no call can still be looking at the registration.
 */
void kvm_luo_unregister(const struct kvm_luo_ops *ops, struct module *owner)
{
	scoped_guard(mutex, &kvm_luo_lock) {
		if (WARN_ON_ONCE(!rcu_access_pointer(kvm_luo_cur) ||
				 kvm_luo_reg.ops != ops ||
				 kvm_luo_reg.owner != owner))
			return;
		RCU_INIT_POINTER(kvm_luo_cur, NULL);
	}
	synchronize_rcu();
}
EXPORT_SYMBOL_FOR_KVM(kvm_luo_unregister);

/* The registration with its owner pinned, or NULL if no KVM is loaded. */
static struct kvm_luo_reg *kvm_luo_get(void)
{
	struct kvm_luo_reg *reg;

	rcu_read_lock();
	reg = rcu_dereference(kvm_luo_cur);
	if (reg && !try_module_get(reg->owner))
		reg = NULL;
	rcu_read_unlock();
	return reg;
}

static void kvm_luo_put(struct kvm_luo_reg *reg)
{
	if (reg)
		module_put(reg->owner);
}

/* Pins KVM for the scope of a call: NULL when no KVM is loaded. */
DEFINE_CLASS(kvm_luo, struct kvm_luo_reg *, kvm_luo_put(_T), kvm_luo_get(), void)

/*
 * The registration, for a caller that holds an object of KVM's (a file, an
 * inode or a VM reference taken here): the object pins the owner, whose exit
 * is what unregisters, so the registration stays. Never NULL but for a bug.
 */
static struct kvm_luo_reg *kvm_luo_held(void)
{
	struct kvm_luo_reg *reg = rcu_dereference_protected(kvm_luo_cur, 1);

	WARN_ON_ONCE(!reg);
	return reg;
}

/**
 * kvm_luo_get_kvm - Take a reference on a VM.
 * @kvm: The VM, of which the caller holds a reference or the file.
 *
 * The reference also pins KVM: a VM does not, only its files do.
 */
void kvm_luo_get_kvm(struct kvm *kvm)
{
	struct kvm_luo_reg *reg = kvm_luo_held();

	if (!reg)
		return;
	__module_get(reg->owner);
	reg->ops->get_kvm(kvm);
}

/**
 * kvm_luo_put_kvm - Drop what kvm_luo_get_kvm() took.
 * @kvm: The VM.
 */
void kvm_luo_put_kvm(struct kvm *kvm)
{
	struct kvm_luo_reg *reg = kvm_luo_held();

	if (!reg)
		return;
	/* The last reference destroys the VM, in KVM's code: still pinned. */
	reg->ops->put_kvm(kvm);
	module_put(reg->owner);
}

/* NULL also when no KVM is loaded: then no file is a VM's. */
struct kvm *kvm_luo_from_vm_file(struct file *file)
{
	CLASS(kvm_luo, reg)();

	return reg ? reg->ops->from_vm_file(file) : NULL;
}

/* ULONG_MAX, which no VM type is, but for a bug. */
unsigned long kvm_luo_vm_type(struct kvm *kvm)
{
	struct kvm_luo_reg *reg = kvm_luo_held();

	return reg ? reg->ops->vm_type(kvm) : ULONG_MAX;
}

bool kvm_luo_vm_is_dead(struct kvm *kvm)
{
	struct kvm_luo_reg *reg = kvm_luo_held();

	return reg ? reg->ops->vm_is_dead(kvm) : true;
}

/* -ENODEV when no KVM is loaded: load kvm-intel or kvm-amd first. */
struct file *kvm_luo_create_vm_file(unsigned long type, const char *fdname)
{
	CLASS(kvm_luo, reg)();

	return reg ? reg->ops->create_vm_file(type, fdname) : ERR_PTR(-ENODEV);
}

struct file *kvm_luo_get_vm_file(struct kvm *kvm)
{
	struct kvm_luo_reg *reg = kvm_luo_held();

	return reg ? reg->ops->get_vm_file(kvm) : NULL;
}

#ifdef CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES
u64 kvm_luo_supported_mem_attributes(struct kvm *kvm)
{
	struct kvm_luo_reg *reg = kvm_luo_held();

	return reg ? reg->ops->supported_mem_attributes(kvm) : 0;
}

int kvm_luo_set_mem_attributes_range(struct kvm *kvm, gfn_t start, gfn_t end,
				     unsigned long attrs)
{
	struct kvm_luo_reg *reg = kvm_luo_held();

	if (!reg)
		return -ENODEV;
	return reg->ops->set_mem_attributes_range(kvm, start, end, attrs);
}

int kvm_luo_walk_mem_attr_ranges(struct kvm *kvm, kvm_mem_attr_range_fn fn,
				 void *opaque)
{
	struct kvm_luo_reg *reg = kvm_luo_held();

	return reg ? reg->ops->walk_mem_attr_ranges(kvm, fn, opaque) : -ENODEV;
}
#endif /* CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES */

#ifdef CONFIG_KVM_GUEST_MEMFD
struct file *kvm_luo_gmem_create_file(struct kvm *kvm, loff_t size, u64 flags)
{
	struct kvm_luo_reg *reg = kvm_luo_held();

	if (!reg)
		return ERR_PTR(-ENODEV);
	return reg->ops->gmem_create_file(kvm, size, flags);
}

/* false also when no KVM is loaded: then no file is a guest_memfd. */
bool kvm_luo_gmem_file_info(struct file *file, struct kvm **kvm, loff_t *size,
			    u64 *flags)
{
	CLASS(kvm_luo, reg)();

	return reg ? reg->ops->gmem_file_info(file, kvm, size, flags) : false;
}

int kvm_luo_gmem_freeze(struct file *file)
{
	struct kvm_luo_reg *reg = kvm_luo_held();

	return reg ? reg->ops->gmem_freeze(file) : -ENODEV;
}

void kvm_luo_gmem_unfreeze(struct file *file)
{
	struct kvm_luo_reg *reg = kvm_luo_held();

	if (reg)
		reg->ops->gmem_unfreeze(file);
}

long kvm_luo_gmem_get_folio_descs(struct file *file, pgoff_t *start,
				  struct kvm_gmem_folio_desc *descs,
				  unsigned int nr)
{
	struct kvm_luo_reg *reg = kvm_luo_held();

	if (!reg)
		return -ENODEV;
	return reg->ops->gmem_get_folio_descs(file, start, descs, nr);
}

int kvm_luo_gmem_set_filler(struct file *file,
			    const struct kvm_gmem_filler_ops *filler_ops,
			    void *filler, const void *owner)
{
	struct kvm_luo_reg *reg = kvm_luo_held();

	if (!reg)
		return -ENODEV;
	return reg->ops->gmem_set_filler(file, filler_ops, filler, owner);
}

/* NULL also when no KVM is loaded: then no file is a guest_memfd. */
void *kvm_luo_gmem_filler(struct file *file, const void *owner)
{
	CLASS(kvm_luo, reg)();

	return reg ? reg->ops->gmem_filler(file, owner) : NULL;
}

int kvm_luo_gmem_fill_pages(struct inode *inode, unsigned long pfn,
			    unsigned long nr, pgoff_t index, bool uptodate,
			    unsigned long *done)
{
	struct kvm_luo_reg *reg = kvm_luo_held();

	if (!reg)
		return -ENODEV;
	return reg->ops->gmem_fill_pages(inode, pfn, nr, index, uptodate, done);
}

/*
 * true when no KVM is loaded: then the guest_memfd's VM cannot be retrieved,
 * which says so (-ENODEV), where "no room" would send the VMM the wrong way.
 */
bool kvm_luo_gmem_memcg_has_room(unsigned long nr_pages)
{
	CLASS(kvm_luo, reg)();

	return reg ? reg->ops->gmem_memcg_has_room(nr_pages) : true;
}

/**
 * kvm_luo_gmem_inode_get - Take a reference on a guest_memfd's inode.
 * @inode: The inode, of which the caller holds a reference or a file.
 *
 * The reference also pins KVM, whose code releases the inode: a worker that
 * holds only the inode keeps KVM loaded until kvm_luo_gmem_inode_put().
 */
void kvm_luo_gmem_inode_get(struct inode *inode)
{
	struct kvm_luo_reg *reg = kvm_luo_held();

	if (reg)
		__module_get(reg->owner);
	ihold(inode);
}

/**
 * kvm_luo_gmem_inode_put - Drop what kvm_luo_gmem_inode_get() took.
 * @inode: The inode.
 */
void kvm_luo_gmem_inode_put(struct inode *inode)
{
	struct kvm_luo_reg *reg = kvm_luo_held();

	/* The last reference evicts the inode, in KVM's code: still pinned. */
	iput(inode);
	if (reg)
		module_put(reg->owner);
}
#endif /* CONFIG_KVM_GUEST_MEMFD */
