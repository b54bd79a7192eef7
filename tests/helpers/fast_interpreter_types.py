"""The Triton interpreter's type objects made lazy or memoized (a block type's name and shape check, a tensor's shape
tuple and numel): part of tests/helpers/fast_interpreter.py (why the interpreter is patched there), split out for
size; loaded by path as that module may be (interpreter_site's children)."""
from __future__ import annotations

import math


def cheap_types(core) -> None:
    """Two per-op costs of the interpreter's type objects, made lazy or memoized (~15 % of an interpreter engine
    test, py-spy, Triton 3.9): every block type formats its name (`f'<{shape}, {element_ty}>'`: a tuple and a
    dtype to text) and checks its shape, and every tensor's shape is a `tl.tuple` whose type is worked out per
    element (`_type_for_tuple_values`), though the interpreter reads neither for most of them. Here a block type's
    name is made when first read (then kept), the shape check's answer is memoized by shape (a bad shape still
    raises, each time), and a `tl.tuple` built without a type gets it when first read: the same values as the
    original's, computed from the same tuple. A tensor's shape constexprs and numel are made once per shape."""
    block_type, ttuple = core.block_type, core.tuple
    validate, unwrap, type_for = core.validate_block_shape, core._unwrap_shape, core._type_for_tuple_values
    numel_of: dict[tuple, int] = {}

    def block_init(self, element_ty, shape):
        # As the original: `tuple` in triton.language.core is its own tl.tuple, so the shape is one (of ints).
        self.element_ty = element_ty
        cls = shape.__class__
        if cls is not list and cls is not ttuple:
            assert isinstance(shape, (list, ttuple))
        # Plain ints (nearly every shape) are what `_unwrap_shape` would return: its two walks are skipped for them
        # (and the tuple is made as `tuple_lazy_init` makes it: its values a list of their own).
        dims = shape.values if isinstance(shape, ttuple) else shape
        if all(type(d) is int for d in dims):
            shape = object.__new__(ttuple)
            shape.values = list(dims)
        else:
            shape = ttuple(unwrap(shape))
        if not shape.values:
            raise TypeError('0d block_type is forbidden')
        self.shape = shape
        key = tuple(shape.values)
        numel = numel_of.get(key)
        if numel is None:
            numel = numel_of[key] = validate(shape)
        self.numel = numel

    def get_name(self):
        name = self.__dict__.get("_moelink_name")
        if name is None:
            name = self.__dict__["_moelink_name"] = f'<{self.shape}, {self.element_ty}>'
        return name

    def set_name(self, value):
        self.__dict__["_moelink_name"] = value

    tuple_init = ttuple.__init__

    def tuple_lazy_init(self, args, type=None):
        if type is not None:
            return tuple_init(self, args, type)
        self.values = [i for i in args]

    def get_type(self):
        found = self.__dict__.get("_moelink_type")
        if found is None:
            found = self.__dict__["_moelink_type"] = type_for(self.values)
        return found

    def set_type(self, value):
        self.__dict__["_moelink_type"] = value

    # A tensor's shape as constexprs and its numel, per shape (the original makes both anew for every tensor): the
    # constexprs and the numel are shared (never changed in place), each tensor still gets a tuple of its own.
    # A block type's or a plain dtype's scalar and dims are read directly (`scalar` is `element_ty` / the dtype
    # itself, iterating a shape iterates its values); the shape's tuple is made as `tuple_lazy_init` makes it.
    constexpr, tensor_shapes, plain, new = core.constexpr, {}, core.dtype, object.__new__

    def tensor_init(self, handle, type):
        self.handle, self.type = handle, type
        cls = type.__class__
        if cls is block_type:
            self.dtype, dims = type.element_ty, tuple(type.shape.values)
        elif cls is plain:
            self.dtype, dims = type, ()
        else:
            self.dtype = type.scalar
            dims = tuple(type.shape) if type.is_block() else ()
        memo = tensor_shapes.get(dims)
        if memo is None:
            memo = tensor_shapes[dims] = ([constexpr(d) for d in dims], constexpr(math.prod(dims)))
        shape = new(ttuple)
        shape.values = memo[0][:]
        self.shape, self.numel = shape, memo[1]

    block_init._moelink_fast = tensor_init._moelink_fast = True
    tensor_init._moelink_original, block_init._moelink_original = core.tensor.__init__, block_type.__init__
    block_type.__init__, block_type.name = block_init, property(get_name, set_name)
    ttuple.__init__, ttuple.type = tuple_lazy_init, property(get_type, set_type)
    core.tensor.__init__ = tensor_init
