defmodule Ottla.Reply do
  @moduledoc false
  # The Elixir half of the NIF's calls that wait on Kafka (native/ottla_nif/src/reply.rs):
  # the NIF starts the work on a Rust thread and returns at once; the thread answers
  # {:ottla_reply, tag, result}. The caller waits here, so no BEAM scheduler waits on Kafka.

  # The Rust side honours the call's own timeout; this covers the reply's trip.
  @margin 2_000

  @doc "Calls `start.(self(), tag)` and waits for its reply."
  @spec await((pid, pos_integer -> :ok | :error), non_neg_integer) :: term
  def await(start, timeout) do
    tag = System.unique_integer([:positive])

    case start.(self(), tag) do
      :ok ->
        receive do
          {:ottla_reply, ^tag, result} -> result
        after
          timeout + @margin ->
            {:error,
             Ottla.Error.new(:timed_out, "no answer from the NIF within #{timeout} ms", true)}
        end

      :error ->
        {:error, Ottla.Error.new(:thread_spawn, "could not start a thread for the call")}
    end
  end
end
