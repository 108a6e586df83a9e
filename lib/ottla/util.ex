defmodule Ottla.Util do
  @moduledoc """
  Helpers Elsa's `Elsa.Util` offered that still make sense without brod.

  `Ottla.produce/4` takes any number of messages in one call (librdkafka batches them by
  `batch.size`), so splitting a list is needed only where an app bounds its own requests,
  e.g. to keep each call under the topic's `max.message.bytes`:

      iex> Ottla.Util.chunk_by_byte_size(["aaaa", "bbbb", "cccc"], 30)
      [["aaaa", "bbbb"], ["cccc"]]

  The rest of `Elsa.Util` has no counterpart: the migration guide says what to use instead.
  """

  @default_chunk_byte_size 900_000

  # Elsa counted 10 bytes for each message besides its key and value (for the timestamp).
  @per_message_bytes 10

  @doc """
  Splits `messages` into lists, in order, each smaller than `chunk_byte_size` bytes, with
  Elsa's sizing: every message counts `byte_size_function.(message) + 10` bytes, and a chunk
  ends before the message that would make it reach `chunk_byte_size`.

  The default size of a message is its key's and value's byte size: a binary or iodata
  value, a `{key, value}` pair, or a map with `:key`, `:value` and optionally `:headers`
  (names and values counted too), as `Ottla.produce/4` takes them; a `nil` key or value
  counts 0.

  A message bigger than `chunk_byte_size` alone makes a chunk of its own. (Elsa emitted an
  empty chunk before it.)

  Raises `ArgumentError` naming the argument when `messages` is not enumerable,
  `chunk_byte_size` is not a positive integer, `byte_size_function` is not a function of one
  argument or returns something other than a non-negative integer, or a message has a shape
  the default size function does not know.

  ## Examples

      iex> Ottla.Util.chunk_by_byte_size([{"k1", "v1"}, {"k2", "v2"}, {"k3", "v3"}], 30)
      [[{"k1", "v1"}, {"k2", "v2"}], [{"k3", "v3"}]]

      iex> Ottla.Util.chunk_by_byte_size(["a", "b", "c"], 20, fn _ -> 5 end)
      [["a"], ["b"], ["c"]]
  """
  @spec chunk_by_byte_size(Enumerable.t(), pos_integer, (term -> non_neg_integer)) :: [list]
  def chunk_by_byte_size(
        messages,
        chunk_byte_size \\ @default_chunk_byte_size,
        byte_size_function \\ &message_byte_size/1
      ) do
    if Enumerable.impl_for(messages) == nil do
      raise ArgumentError,
            "invalid messages #{inspect(messages)}: expected a list or another enumerable"
    end

    unless is_integer(chunk_byte_size) and chunk_byte_size > 0 do
      raise ArgumentError,
            "invalid chunk_byte_size #{inspect(chunk_byte_size)}: expected a positive integer"
    end

    unless is_function(byte_size_function, 1) do
      raise ArgumentError,
            "invalid byte_size_function #{inspect(byte_size_function)}: expected a function " <>
              "of one argument"
    end

    messages
    |> Enum.chunk_while(
      {0, []},
      fn message, {size, chunk} ->
        message_size = size!(byte_size_function.(message), message) + @per_message_bytes

        cond do
          size + message_size < chunk_byte_size ->
            {:cont, {size + message_size, [message | chunk]}}

          chunk == [] ->
            {:cont, [message], {0, []}}

          true ->
            {:cont, Enum.reverse(chunk), {message_size, [message]}}
        end
      end,
      fn
        {_size, []} -> {:cont, {0, []}}
        {_size, chunk} -> {:cont, Enum.reverse(chunk), {0, []}}
      end
    )
  end

  defp size!(size, _message) when is_integer(size) and size >= 0, do: size

  defp size!(size, message) do
    raise ArgumentError,
          "invalid byte_size_function: it returned #{inspect(size)} for #{inspect(message)}, " <>
            "expected a non-negative integer"
  end

  # The key and value bytes of a message in any shape Ottla.produce/4 takes.
  defp message_byte_size({key, value}), do: bytes(key, {key, value}) + bytes(value, {key, value})

  defp message_byte_size(%{} = message) when not is_struct(message) do
    headers = Map.get(message, :headers) || []

    unless Ottla.Options.proper_list?(headers), do: unknown!(message)

    header_bytes =
      Enum.reduce(headers, 0, fn
        {name, value}, acc -> acc + bytes(name, message) + bytes(value, message)
        _other, _acc -> unknown!(message)
      end)

    bytes(Map.get(message, :key), message) + bytes(Map.get(message, :value), message) +
      header_bytes
  end

  defp message_byte_size(value), do: bytes(value, value)

  defp bytes(nil, _message), do: 0
  defp bytes(binary, _message) when is_binary(binary), do: byte_size(binary)

  defp bytes(iodata, message) when is_list(iodata) do
    IO.iodata_length(iodata)
  rescue
    ArgumentError -> unknown!(message)
  end

  defp bytes(_other, message), do: unknown!(message)

  defp unknown!(message) do
    raise ArgumentError,
          "invalid message #{inspect(message)}: chunk_by_byte_size/3 sizes binaries, iodata, " <>
            "{key, value} pairs and maps with :key, :value and :headers; pass a " <>
            "byte_size_function for other shapes"
  end
end
